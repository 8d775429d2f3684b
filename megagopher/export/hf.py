"""Export a checkpoint as a Hugging Face ``transformers`` model directory: config.json, model.safetensors
and, when the run had a tokenizer, the files ``AutoTokenizer`` loads it from, whatever its kind
(hf_tokenizer.py), with config.json's bos_token_id / eos_token_id its BOS and end-of-document ids. Every
file is written under a temporary name, fsynced and renamed.

Five formats cover megagopher's model flavours; ``choose_format`` picks the first that expresses the
model exactly and an explicit choice is checked the same way:

  llama     LlamaForCausalLM:   rmsnorm, swiglu, rope on the whole head, sequential residual; GQA kept;
                                biases through attention_bias / mlp_bias.
  gpt_neox  GPTNeoXForCausalLM: layernorm, gelu (tanh or exact), rope (partial rotary as rotary_pct),
                                sequential or parallel residual; no GQA.
  gpt2      GPT2LMHeadModel:    layernorm, gelu (tanh or exact), learned positions, sequential residual;
                                no GQA.
  codegen   CodeGenForCausalLM: layernorm, gelu, rope (rotary_dim, base 10000), parallel residual, no
                                attention biases, an output bias (lm_head.bias); no GQA, heads % 4 == 0.
  mixtral   MixtralForCausalLM: Llama's layer without biases, a MoE block in every layer: softmax
                                router, top-k renormalised, dropless, no shared experts; GQA kept.
  mistral   MistralForCausalLM: Llama's layer without biases, a sliding window in every layer.
  qwen2     Qwen2ForCausalLM:   Llama's layer with biases on q, k, v only (model.qkv_bias), a sliding
                                window on any layers (layer_types).
  qwen3     Qwen3ForCausalLM:   Llama's layer without biases, with per-head q/k RMSNorm (model.qk_norm),
                                a sliding window on any layers (layer_types).
  qwen3_moe Qwen3MoeForCausalLM: Qwen3's attention, softmax-routed experts (renormalised or not), dense
                                layers anywhere (mlp_only_layers), a sliding window in every layer or none.
  deepseek_v3 DeepseekV3ForCausalLM: multi-head latent attention, sigmoid routing with the selection bias,
                                group-limited, scaled, shared experts, dense first layers, RoPE / YaRN; the
                                multi-token prediction modules in mtp.safetensors (below).
Llama and every format after it carry model.rope_scaling 'linear', 'llama3' and (without mscale_all_dim,
which scales the softmax of DeepSeek's attention only) 'yarn', and a head width apart from hidden_size /
heads (head_dim, model.kv_channels). Their config.json is hf_config_recent.py's, their weights
hf_arch_recent.py's.

The MTP file. transformers' DeepseekV3ForCausalLM does not run multi-token prediction, so its modules ride
beside the model in OUT/mtp.safetensors, under the names DeepSeek's published checkpoints give them: module
k is layer num_hidden_layers + k, model.layers.{L+k}.enorm.weight, .hnorm.weight, .eh_proj.weight (the
projection of [enorm(embedding); hnorm(hidden)]), the transformer layer's own tensors under the same names
as a layer of the model (input_layernorm, self_attn.*, post_attention_layernorm, mlp.*), and
.shared_head.norm.weight (the module's final norm); the shared embedding and head are written too, as
.embed_tokens.weight and .shared_head.head.weight (copies, checked equal on import). config.json's
num_nextn_predict_layers counts the modules; the import reads the file back (hf_import.py).

The weight mapping, both ways, is hf_arch.py's (the import, hf_import.py, reads it backwards). GeLU is
"gelu_pytorch_tanh" (GPT-2's "gelu_new" formula) for ours, "gelu" for gelu_exact. A model without biases
is written with zero biases where the format always has them (the same function); the vocabulary is the
real one (CheckpointReader drops the TP padding); tied embeddings become tie_word_embeddings = true.
"""
import os

import torch
from safetensors.torch import save_file

from megagopher.common import TRAINING_DTYPES, dtype_name
from megagopher.export.hf_arch import CODEGEN_MP_NUM, FORMATS, HF_ACT, MappingError, missing_bias_rows
from megagopher.export.hf_rules import rules
from megagopher.export.hf_arch_recent import MTP_FILE, is_mtp_name
from megagopher.export.hf_config_recent import RECENT, recent_problems, rope_legacy, write_recent, write_rope
from megagopher.export.hf_tokenizer import special_ids, write_json_durably, write_tokenizer
from megagopher.export.loading import load_run_tokenizer, model_config_of, open_checkpoint
from megagopher.training.ckpt_files import fsync_file

DTYPE_NAMES = {dtype: dtype_name(dtype) for dtype in TRAINING_DTYPES}  # the export dtypes, config.json's names
GELUS = ("gelu", "gelu_exact")


class ExportError(ValueError):
    pass


def format_problems(cfg, fmt):
    """Why ``fmt`` cannot express the model ``cfg`` (an empty list when it can)."""
    if fmt not in FORMATS:
        raise ExportError(f"format {fmt!r}; valid: {', '.join(FORMATS)}")
    problems = []

    def need(ok, text):
        if not ok:
            problems.append(text)

    no_gqa = (f"has no grouped-query attention (num_query_groups = {cfg.num_query_groups}, "
              f"num_attention_heads = {cfg.num_attention_heads})")
    rope = f"needs position_embedding 'rope', not {cfg.position_embedding!r}"
    layernorm = f"needs normalization 'layernorm', not {cfg.normalization!r}"
    gelu = f"needs activation 'gelu' or 'gelu_exact', not {cfg.activation!r}"
    llama_family = fmt in ("llama", "mixtral") or fmt in RECENT
    if fmt != "codegen":
        need(not cfg.output_bias, "has no output-layer bias (model.output_bias)")
    problems += recent_problems(cfg, fmt)
    if fmt in RECENT:
        need(not cfg.bias, "has no biases on o_proj and the MLP (model.bias = true)")
    if llama_family:
        need(cfg.normalization == "rmsnorm", f"needs normalization 'rmsnorm', not {cfg.normalization!r}")
        need(cfg.activation == "swiglu", f"needs activation 'swiglu', not {cfg.activation!r}")
        need(cfg.position_embedding == "rope", rope)
        need(cfg.position_embedding != "rope" or cfg.rotary_dim == cfg.head_dim or cfg.is_mla,
             f"rotates the whole head; rotary_percent = {cfg.rotary_percent} rotates {cfg.rotary_dim} of "
             f"{cfg.head_dim}")
        need(not cfg.parallel_residual, "has no parallel residual")
    if fmt == "mixtral":
        problems += _mixtral_problems(cfg)
    elif fmt == "gpt_neox":
        need(cfg.normalization == "layernorm", layernorm)
        need(cfg.activation in GELUS, gelu)
        need(cfg.position_embedding == "rope", rope)
        need(cfg.num_query_groups == cfg.num_attention_heads, no_gqa)
    elif fmt == "gpt2":
        need(cfg.normalization == "layernorm", layernorm)
        need(cfg.activation in GELUS, gelu)
        need(cfg.position_embedding == "learned", f"needs position_embedding 'learned', not {cfg.position_embedding!r}")
        need(not cfg.parallel_residual, "has no parallel residual")
        need(cfg.num_query_groups == cfg.num_attention_heads, no_gqa)
    elif fmt == "codegen":
        need(cfg.normalization == "layernorm", layernorm)
        need(cfg.activation in GELUS, gelu)
        need(cfg.position_embedding == "rope", rope)
        need(cfg.position_embedding != "rope" or float(cfg.rope_theta) == 10000.0,
             f"has rotary base 10000 only, not rope_theta = {cfg.rope_theta}")
        need(cfg.parallel_residual, "needs parallel_residual = true")
        need(cfg.num_query_groups == cfg.num_attention_heads, no_gqa)
        need(cfg.num_attention_heads % CODEGEN_MP_NUM == 0,
             f"needs num_attention_heads divisible by {CODEGEN_MP_NUM}, not {cfg.num_attention_heads}")
    return problems


def _mixtral_problems(cfg):
    """What Mixtral's layer cannot express beyond its routing (hf_config_recent.recent_problems checks that:
    softmax top-k renormalised, dropless, experts in every layer, no shared experts)."""
    return [] if not cfg.bias else ["has no biases (model.bias = true)"]


def choose_format(cfg, fmt=None):
    """The format to write: ``fmt`` if it fits, else the one that fits; ExportError naming the reasons."""
    if fmt is not None:
        problems = format_problems(cfg, fmt)
        if problems:
            raise ExportError(f"format {fmt!r} cannot express this model: it " + "; it ".join(problems))
        return fmt
    reasons = {}
    for candidate in FORMATS:
        reasons[candidate] = format_problems(cfg, candidate)
        if not reasons[candidate]:
            return candidate
    detail = "; ".join(f"{f} {', '.join(r)}" for f, r in reasons.items())
    experts = f", {cfg.num_experts} experts" if cfg.num_experts else ""
    raise ExportError(f"no Hugging Face format expresses this model ({cfg.normalization}, {cfg.activation}, "
                      f"{cfg.position_embedding} positions, parallel_residual = {cfg.parallel_residual}, "
                      f"{cfg.num_query_groups} query groups of {cfg.num_attention_heads} heads{experts}): "
                      f"{detail}")


# -- weights ----------------------------------------------------------------------------------------------
class _Source:
    """Our full tensors by name, in the export dtype; zeros stand in for biases the model lacks."""

    def __init__(self, reader, dtype):
        self.reader, self.dtype = reader, dtype
        self.shapes = {name: reader.entry(name)["full_shape"] for name in reader.names()}

    def __call__(self, name):
        if name in self.shapes:  # the selection bias stays fp32, as transformers keeps e_score_correction_bias
            return self.reader.full_tensor(name).to(torch.float32 if name.endswith(".expert_bias") else self.dtype)
        rows = missing_bias_rows(name, self.shapes)
        if rows is None:
            raise ExportError(f"the checkpoint has no tensor {name!r}")
        return torch.zeros(rows, dtype=self.dtype)


def hf_tensors(src, fmt, cfg):
    """Their whole state dict, in order, through hf_arch's rules."""
    out = {}
    for rule in rules(fmt, cfg):
        try:
            theirs = rule.to_theirs(*(src(name) for name in rule.ours))
        except MappingError as e:
            raise ExportError(f"format {fmt!r} cannot express this model: {e}") from None
        out.update(zip(rule.theirs, theirs))
    return out


# -- config.json ---------------------------------------------------------------------------------------------
def _rope(cfg):
    return {"rope_type": "default", "rope_theta": float(cfg.rope_theta)}


def hf_config(cfg, fmt, dtype, bos=None, eos=None):
    """config.json for ``fmt``, with the tokenizer's ``bos`` and ``eos`` ids. Written for transformers 4.x
    and 5.x alike: RoPE both as the legacy keys (rope_theta, rotary_pct, rotary_emb_base) and as
    rope_parameters."""
    common = {"vocab_size": cfg.vocab_size, "tie_word_embeddings": bool(cfg.tie_embeddings),
              "torch_dtype": DTYPE_NAMES[dtype], "dtype": DTYPE_NAMES[dtype], "use_cache": True,
              "bos_token_id": bos, "eos_token_id": eos, "initializer_range": cfg.init_std}
    llama = {"hidden_size": cfg.hidden_size, "intermediate_size": cfg.ffn_hidden_size,
             "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_attention_heads,
             "num_key_value_heads": cfg.num_query_groups, "head_dim": cfg.head_dim, "hidden_act": "silu",
             "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.norm_epsilon,
             "rope_theta": float(cfg.rope_theta), "rope_parameters": write_rope(cfg), "rope_scaling": rope_legacy(cfg),
             "attention_bias": bool(cfg.bias), "mlp_bias": bool(cfg.bias), "attention_dropout": 0.0,
             "pretraining_tp": 1}
    if fmt == "llama":
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **common, **llama}
    if fmt in RECENT:
        return write_recent(cfg, fmt, common, llama)
    if fmt == "mixtral":
        return _mixtral_config(cfg, common)
    if fmt == "gpt_neox":
        factor = cfg.rotary_dim / cfg.head_dim
        if int(cfg.head_dim * factor) != cfg.rotary_dim:
            raise ExportError(f"rotary_dim {cfg.rotary_dim} of head_dim {cfg.head_dim} is not representable as "
                              "transformers' int(head_dim * rotary_pct)")
        return {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", **common,
                "hidden_size": cfg.hidden_size, "intermediate_size": cfg.ffn_hidden_size,
                "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_attention_heads,
                "hidden_act": HF_ACT[cfg.activation], "max_position_embeddings": cfg.max_position_embeddings,
                "layer_norm_eps": cfg.norm_epsilon, "use_parallel_residual": bool(cfg.parallel_residual),
                "rotary_pct": factor, "rotary_emb_base": float(cfg.rope_theta),
                "rope_parameters": {**_rope(cfg), "partial_rotary_factor": factor}, "rope_scaling": None,
                "attention_bias": True, "attention_dropout": 0.0, "hidden_dropout": 0.0}
    if fmt == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", **common,
                "n_embd": cfg.hidden_size, "n_layer": cfg.num_layers, "n_head": cfg.num_attention_heads,
                "n_inner": cfg.ffn_hidden_size, "n_positions": cfg.max_position_embeddings,
                "n_ctx": cfg.max_position_embeddings, "activation_function": HF_ACT[cfg.activation],
                "layer_norm_epsilon": cfg.norm_epsilon, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
                "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                "reorder_and_upcast_attn": False}
    if fmt == "codegen":
        return {"architectures": ["CodeGenForCausalLM"], "model_type": "codegen", **common,
                "n_embd": cfg.hidden_size, "n_layer": cfg.num_layers, "n_head": cfg.num_attention_heads,
                "n_inner": cfg.ffn_hidden_size, "n_positions": cfg.max_position_embeddings,
                "n_ctx": cfg.max_position_embeddings, "rotary_dim": cfg.rotary_dim,
                "activation_function": HF_ACT[cfg.activation], "layer_norm_epsilon": cfg.norm_epsilon,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    raise ExportError(f"format {fmt!r}; valid: {', '.join(FORMATS)}")


def _mixtral_config(cfg, common):
    """Mixtral's config.json. The aux-loss coefficients are training hyperparameters, kept for a round
    trip, not a function: transformers' load-balancing loss (added only with output_router_logits) is
    taken once over every layer's tokens together and counts top-k assignments without dividing by k,
    ours is a sum of per-layer terms. What Mixtral has no key for rides along in the "megagopher" table for
    the import: the z-loss and the dense ffn_hidden_size (unused with experts in every layer, but part of
    the [model] a run resuming the import is checked against)."""
    return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", **common,
            "hidden_size": cfg.hidden_size, "intermediate_size": cfg.moe_ffn_hidden_size,
            "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_query_groups, "head_dim": cfg.head_dim, "hidden_act": "silu",
            "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.norm_epsilon,
            "rope_theta": float(cfg.rope_theta), "rope_parameters": write_rope(cfg), "rope_scaling": rope_legacy(cfg),
            "sliding_window": None, "attention_dropout": 0.0, "num_local_experts": cfg.num_experts,
            "num_experts_per_tok": cfg.moe_top_k, "router_jitter_noise": 0.0, "output_router_logits": False,
            "router_aux_loss_coef": cfg.moe_aux_loss_coeff,
            "megagopher": {"ffn_hidden_size": cfg.ffn_hidden_size, "moe_z_loss_coeff": cfg.moe_z_loss_coeff}}


# -- the export -----------------------------------------------------------------------------------------------
def export_hf(checkpoint, output, fmt=None, dtype=None, tokenizer_dir=None, tokenizer=True):
    """Writes the Hugging Face directory ``output`` for ``checkpoint``; returns (format, iter directory).
    ``dtype``: a torch dtype, or None to keep the checkpoint's. The run's tokenizer (or the one in
    ``tokenizer_dir``) is written too unless ``tokenizer`` is false."""
    reader = open_checkpoint(checkpoint)
    cfg = model_config_of(reader)
    fmt = choose_format(cfg, fmt)
    tok = load_run_tokenizer(reader, tokenizer_dir, required=tokenizer_dir is not None) if tokenizer else None
    if dtype is None:
        dtype = reader.full_tensor("embedding.word.weight").dtype
    if dtype not in DTYPE_NAMES:
        raise ExportError(f"dtype {dtype}; valid: {', '.join(DTYPE_NAMES.values())}")
    tensors = hf_tensors(_Source(reader, dtype), fmt, cfg)
    os.makedirs(output, exist_ok=True)
    config = hf_config(cfg, fmt, dtype, *special_ids(tok))
    config["megagopher"] = {**config.get("megagopher", {}), "checkpoint": os.path.abspath(reader.path),
                            "iteration": reader.meta["iteration"]}
    write_json_durably(os.path.join(output, "config.json"), config)
    # safetensors refuses tensors that share memory (a tied head is the embedding): each gets its own copy.
    tensors = {name: t.detach().cpu().contiguous().clone() for name, t in tensors.items()}
    mtp = {name: t for name, t in tensors.items() if is_mtp_name(cfg, name)}
    files = [("model.safetensors", {n: t for n, t in tensors.items() if n not in mtp})]
    for name, part in files + ([(MTP_FILE, mtp)] if mtp else []):
        weights = os.path.join(output, name)
        save_file(part, weights + ".tmp", metadata={"format": "pt"})
        fsync_file(weights + ".tmp")
        os.replace(weights + ".tmp", weights)
    if tok is not None:
        write_tokenizer(tok, output, cfg.max_position_embeddings)
    return fmt, reader.path
