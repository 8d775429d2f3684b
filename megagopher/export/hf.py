"""Export a checkpoint as a Hugging Face ``transformers`` model directory: config.json, model.safetensors
and, when the run had a tokenizer, GPT-2 tokenizer files (vocab.json, merges.txt, tokenizer_config.json,
special_tokens_map.json).

Three formats cover megagopher's model flavours; ``choose_format`` picks the one that expresses the
model exactly and an explicit choice is checked the same way:

  llama     LlamaForCausalLM:   rmsnorm, swiglu, rope on the whole head, sequential residual; GQA kept;
                                biases through attention_bias / mlp_bias.
  gpt_neox  GPTNeoXForCausalLM: layernorm, gelu, rope (partial rotary as rotary_pct), sequential or
                                parallel residual; no GQA.
  gpt2      GPT2LMHeadModel:    layernorm, gelu, learned positions, sequential residual; no GQA.

Weight mapping, from our names (model/gpt.py) to theirs:
  - Our fused QKV is laid out per query group, [q_g0 (heads/groups heads), k_g0, v_g0, q_g1, ...]. Llama
    takes separate q/k/v projections (query head h uses kv head h // (heads/groups), as ours). NeoX fuses
    per head, [q_h, k_h, v_h]: with one query head per group that *is* our layout, so it is copied as is.
    GPT-2's c_attn is [q; k; v] concatenated, stored transposed (Conv1D is x @ W).
  - RoPE: ours is the rotate-half convention on the first rotary_dim channels of each head, as Llama's and
    NeoX's, so q and k rows need no permutation (the tests compare logits).
  - Our SwiGLU fc1 is the gate and up projections in one matrix, rows interleaved channel by channel
    [gate_0, up_0, gate_1, up_1, ...] (model/gpt.py MLP): Llama's gate_proj is its even rows, up_proj its
    odd rows.
  - Parallel residual uses one input norm for both branches (GPT-J); NeoX has one per branch, so the norm
    is written twice (input_layernorm and post_attention_layernorm).
  - GeLU is the tanh approximation, "gelu_pytorch_tanh" (the same formula as GPT-2's "gelu_new").
  - A model without biases is written with zero biases where the format always has them (NeoX's MLP,
    every GPT-2 linear): the same function.
  - The vocabulary is the real one: TP padding never reaches the export (CheckpointReader drops it).
  - Tied embeddings become tie_word_embeddings = true with no separate output matrix.
"""
import json
import os

import torch
from safetensors.torch import save_file

from megagopher.export.loading import load_run_tokenizer, model_config_of, open_checkpoint

FORMATS = ("llama", "gpt_neox", "gpt2")
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
GELU = "gelu_pytorch_tanh"


class ExportError(ValueError):
    pass


def format_problems(cfg, fmt):
    """Why ``fmt`` cannot express the model ``cfg`` (an empty list when it can)."""
    problems = []

    def need(ok, text):
        if not ok:
            problems.append(text)

    if fmt == "llama":
        need(cfg.normalization == "rmsnorm", f"needs normalization 'rmsnorm', not {cfg.normalization!r}")
        need(cfg.activation == "swiglu", f"needs activation 'swiglu', not {cfg.activation!r}")
        need(cfg.position_embedding == "rope", f"needs position_embedding 'rope', not {cfg.position_embedding!r}")
        need(cfg.position_embedding != "rope" or cfg.rotary_dim == cfg.head_dim,
             f"rotates the whole head; rotary_percent = {cfg.rotary_percent} rotates {cfg.rotary_dim} of "
             f"{cfg.head_dim}")
        need(not cfg.parallel_residual, "has no parallel residual")
    elif fmt == "gpt_neox":
        need(cfg.normalization == "layernorm", f"needs normalization 'layernorm', not {cfg.normalization!r}")
        need(cfg.activation == "gelu", f"needs activation 'gelu', not {cfg.activation!r}")
        need(cfg.position_embedding == "rope", f"needs position_embedding 'rope', not {cfg.position_embedding!r}")
        need(cfg.num_query_groups == cfg.num_attention_heads,
             f"has no grouped-query attention (num_query_groups = {cfg.num_query_groups}, "
             f"num_attention_heads = {cfg.num_attention_heads})")
    elif fmt == "gpt2":
        need(cfg.normalization == "layernorm", f"needs normalization 'layernorm', not {cfg.normalization!r}")
        need(cfg.activation == "gelu", f"needs activation 'gelu', not {cfg.activation!r}")
        need(cfg.position_embedding == "learned", f"needs position_embedding 'learned', not {cfg.position_embedding!r}")
        need(not cfg.parallel_residual, "has no parallel residual")
        need(cfg.num_query_groups == cfg.num_attention_heads,
             f"has no grouped-query attention (num_query_groups = {cfg.num_query_groups}, "
             f"num_attention_heads = {cfg.num_attention_heads})")
    else:
        raise ExportError(f"format {fmt!r}; valid: {', '.join(FORMATS)}")
    return problems


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
    raise ExportError(f"no Hugging Face format expresses this model ({cfg.normalization}, {cfg.activation}, "
                      f"{cfg.position_embedding} positions, parallel_residual = {cfg.parallel_residual}, "
                      f"{cfg.num_query_groups} query groups of {cfg.num_attention_heads} heads): {detail}")


# -- weights ----------------------------------------------------------------------------------------------
class _Source:
    """Our full tensors by name, in the export dtype; zeros stand in for biases the model lacks."""

    def __init__(self, reader, cfg, dtype):
        self.reader, self.cfg, self.dtype = reader, cfg, dtype
        self.names = set(reader.names())

    def __call__(self, name):
        return self.reader.full_tensor(name).to(self.dtype)

    def bias(self, name, size):
        return self(name) if name in self.names else torch.zeros(size, dtype=self.dtype)

    def qkv(self, layer, part="weight"):
        """q, k, v rows of layer ``layer``'s fused projection, each [n_heads * d, ...]."""
        cfg = self.cfg
        g, d = cfg.num_query_groups, cfg.head_dim
        hpg = cfg.num_attention_heads // g
        name = f"layers.{layer}.attention.qkv.{part}"
        full = self(name) if part == "weight" or name in self.names else \
            torch.zeros(g * (hpg + 2) * d, dtype=self.dtype)
        grouped = full.reshape(g, hpg + 2, d, *full.shape[1:])
        q = grouped[:, :hpg].reshape(g * hpg * d, *full.shape[1:])
        k = grouped[:, hpg].reshape(g * d, *full.shape[1:])
        v = grouped[:, hpg + 1].reshape(g * d, *full.shape[1:])
        return full, q, k, v

    def gate_up(self, layer, part="weight"):
        """gate and up rows of layer ``layer``'s SwiGLU fc1 (interleaved: gate even, up odd), each [ffn, ...]."""
        full = self(f"layers.{layer}.mlp.fc1.{part}")
        return full[0::2].contiguous(), full[1::2].contiguous()

    def output(self):
        return None if self.cfg.tie_embeddings else self("output_layer")


def _assemble(src, before, layer_prefix, layer, after, head):
    """Their whole state dict, in order: ``before`` (their name: ours), each layer's tensors from
    ``layer(src, i, ours, theirs)`` with our prefix ``layers.{i}.`` and theirs ``{layer_prefix}{i}.``,
    ``after``, then the output layer as ``head`` unless the embeddings are tied."""
    out = {theirs: src(ours) for theirs, ours in before.items()}
    for i in range(src.cfg.num_layers):
        out.update(layer(src, i, f"layers.{i}.", f"{layer_prefix}{i}."))
    out.update({theirs: src(ours) for theirs, ours in after.items()})
    if src.output() is not None:
        out[head] = src.output()
    return out


# Llama's linears besides q/k/v and gate/up, by their name and ours.
_LLAMA_LINEARS = (("self_attn.o_proj", "attention.proj"), ("mlp.down_proj", "mlp.fc2"))


def _llama_layer(src, i, p, o):
    out = {o + "input_layernorm.weight": src(p + "input_norm.weight"),
           o + "post_attention_layernorm.weight": src(p + "post_attention_norm.weight")}
    for part in ("weight", "bias") if src.cfg.bias else ("weight",):
        _, q, k, v = src.qkv(i, part)
        out.update({f"{o}self_attn.{name}_proj.{part}": t for name, t in zip("qkv", (q, k, v))})
        out.update({f"{o}mlp.{name}_proj.{part}": t for name, t in zip(("gate", "up"), src.gate_up(i, part))})
        out.update({f"{o}{theirs}.{part}": src(f"{p}{ours}.{part}") for theirs, ours in _LLAMA_LINEARS})
    return out


def llama_tensors(src):
    return _assemble(src, {"model.embed_tokens.weight": "embedding.word.weight"}, "model.layers.", _llama_layer,
                     {"model.norm.weight": "final_norm.weight"}, "lm_head.weight")


def _norms(src, pairs):
    """Weight and bias of each (our norm's full name, their name) in ``pairs``."""
    out = {}
    for ours, theirs in pairs:
        out[theirs + ".weight"] = src(ours + ".weight")
        out[theirs + ".bias"] = src(ours + ".bias")
    return out


def _final_norm(theirs):
    """Their names of the final norm's weight and bias: our final_norm's (for ``_assemble``'s ``after``)."""
    return {theirs + ".weight": "final_norm.weight", theirs + ".bias": "final_norm.bias"}


def _neox_layer(src, i, p, o):
    h, f = src.cfg.hidden_size, src.cfg.ffn_hidden_size
    second = p + ("input_norm" if src.cfg.parallel_residual else "post_attention_norm")
    out = _norms(src, ((p + "input_norm", o + "input_layernorm"), (second, o + "post_attention_layernorm")))
    # One query head per group: our [q_g, k_g, v_g] per group is NeoX's [q_h, k_h, v_h] per head.
    out[o + "attention.query_key_value.weight"] = src.qkv(i)[0]
    out[o + "attention.query_key_value.bias"] = src.qkv(i, "bias")[0]
    out[o + "attention.dense.weight"] = src(p + "attention.proj.weight")
    out[o + "attention.dense.bias"] = src.bias(p + "attention.proj.bias", h)
    out[o + "mlp.dense_h_to_4h.weight"] = src(p + "mlp.fc1.weight")
    out[o + "mlp.dense_h_to_4h.bias"] = src.bias(p + "mlp.fc1.bias", f)
    out[o + "mlp.dense_4h_to_h.weight"] = src(p + "mlp.fc2.weight")
    out[o + "mlp.dense_4h_to_h.bias"] = src.bias(p + "mlp.fc2.bias", h)
    return out


def neox_tensors(src):
    return _assemble(src, {"gpt_neox.embed_in.weight": "embedding.word.weight"}, "gpt_neox.layers.", _neox_layer,
                     _final_norm("gpt_neox.final_layer_norm"), "embed_out.weight")


def _gpt2_layer(src, i, p, o):
    h, f = src.cfg.hidden_size, src.cfg.ffn_hidden_size
    out = _norms(src, ((p + "input_norm", o + "ln_1"), (p + "post_attention_norm", o + "ln_2")))
    _, q, k, v = src.qkv(i)
    _, qb, kb, vb = src.qkv(i, "bias")
    # Conv1D computes x @ W + b: our [out, in] Linear weights transposed.
    out[o + "attn.c_attn.weight"] = torch.cat([q, k, v], dim=0).t()
    out[o + "attn.c_attn.bias"] = torch.cat([qb, kb, vb])
    out[o + "attn.c_proj.weight"] = src(p + "attention.proj.weight").t()
    out[o + "attn.c_proj.bias"] = src.bias(p + "attention.proj.bias", h)
    out[o + "mlp.c_fc.weight"] = src(p + "mlp.fc1.weight").t()
    out[o + "mlp.c_fc.bias"] = src.bias(p + "mlp.fc1.bias", f)
    out[o + "mlp.c_proj.weight"] = src(p + "mlp.fc2.weight").t()
    out[o + "mlp.c_proj.bias"] = src.bias(p + "mlp.fc2.bias", h)
    return out


def gpt2_tensors(src):
    return _assemble(src, {"transformer.wte.weight": "embedding.word.weight",
                           "transformer.wpe.weight": "embedding.position"}, "transformer.h.", _gpt2_layer,
                     _final_norm("transformer.ln_f"), "lm_head.weight")


# -- config.json ---------------------------------------------------------------------------------------------
def _rope(cfg):
    return {"rope_type": "default", "rope_theta": float(cfg.rope_theta)}


def hf_config(cfg, fmt, dtype, eod=None):
    """config.json for ``fmt``. Written for transformers 4.x and 5.x alike: RoPE both as the legacy keys
    (rope_theta, rotary_pct, rotary_emb_base) and as rope_parameters."""
    common = {"vocab_size": cfg.vocab_size, "tie_word_embeddings": bool(cfg.tie_embeddings),
              "torch_dtype": DTYPE_NAMES[dtype], "dtype": DTYPE_NAMES[dtype], "use_cache": True,
              "bos_token_id": eod, "eos_token_id": eod, "initializer_range": cfg.init_std}
    if fmt == "llama":
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **common,
                "hidden_size": cfg.hidden_size, "intermediate_size": cfg.ffn_hidden_size,
                "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_attention_heads,
                "num_key_value_heads": cfg.num_query_groups, "head_dim": cfg.head_dim, "hidden_act": "silu",
                "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.norm_epsilon,
                "rope_theta": float(cfg.rope_theta), "rope_parameters": _rope(cfg), "rope_scaling": None,
                "attention_bias": bool(cfg.bias), "mlp_bias": bool(cfg.bias), "attention_dropout": 0.0,
                "pretraining_tp": 1}
    if fmt == "gpt_neox":
        factor = cfg.rotary_dim / cfg.head_dim
        if int(cfg.head_dim * factor) != cfg.rotary_dim:
            raise ExportError(f"rotary_dim {cfg.rotary_dim} of head_dim {cfg.head_dim} is not representable as "
                              "transformers' int(head_dim * rotary_pct)")
        return {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", **common,
                "hidden_size": cfg.hidden_size, "intermediate_size": cfg.ffn_hidden_size,
                "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_attention_heads,
                "hidden_act": GELU, "max_position_embeddings": cfg.max_position_embeddings,
                "layer_norm_eps": cfg.norm_epsilon, "use_parallel_residual": bool(cfg.parallel_residual),
                "rotary_pct": factor, "rotary_emb_base": float(cfg.rope_theta),
                "rope_parameters": {**_rope(cfg), "partial_rotary_factor": factor}, "rope_scaling": None,
                "attention_bias": True, "attention_dropout": 0.0, "hidden_dropout": 0.0}
    if fmt == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", **common,
                "n_embd": cfg.hidden_size, "n_layer": cfg.num_layers, "n_head": cfg.num_attention_heads,
                "n_inner": cfg.ffn_hidden_size, "n_positions": cfg.max_position_embeddings,
                "n_ctx": cfg.max_position_embeddings, "activation_function": GELU,
                "layer_norm_epsilon": cfg.norm_epsilon, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
                "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                "reorder_and_upcast_attn": False}
    raise ExportError(f"format {fmt!r}; valid: {', '.join(FORMATS)}")


TENSORS = {"llama": llama_tensors, "gpt_neox": neox_tensors, "gpt2": gpt2_tensors}


# -- tokenizer files -----------------------------------------------------------------------------------------
def write_tokenizer(tok, output, model_max_length):
    """GPT-2 tokenizer files for ``tok`` (megagopher.data.tokenizer.Tokenizer). merges.txt gets GPT-2's
    "#version" first line, which Hugging Face's reader skips unconditionally."""
    from megagopher.data.tokenizer import EOD_TOKEN, read_vocab_files
    vocab, merges = read_vocab_files(tok.directory)
    with open(os.path.join(output, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(output, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    extra = sorted((t for t in tok.special_tokens if t != EOD_TOKEN), key=lambda t: tok.special_tokens[t])
    special = {"bos_token": EOD_TOKEN, "eos_token": EOD_TOKEN, "unk_token": EOD_TOKEN}
    if extra:
        special["additional_special_tokens"] = extra
    added = {str(i): {"content": t, "lstrip": False, "rstrip": False, "normalized": False, "single_word": False,
                      "special": True} for t, i in sorted(tok.special_tokens.items(), key=lambda kv: kv[1])}
    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": model_max_length, "add_prefix_space": False,
              "add_bos_token": False, "errors": "replace", "clean_up_tokenization_spaces": False,
              "added_tokens_decoder": added, **special}
    for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
        with open(os.path.join(output, name), "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2, ensure_ascii=False)


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
    tensors = TENSORS[fmt](_Source(reader, cfg, dtype))
    os.makedirs(output, exist_ok=True)
    config = hf_config(cfg, fmt, dtype, tok.eod if tok is not None else None)
    config["megagopher"] = {"checkpoint": os.path.abspath(reader.path), "iteration": reader.meta["iteration"]}
    with open(os.path.join(output, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    # safetensors refuses tensors that share memory (a tied head is the embedding): each gets its own copy.
    tensors = {name: t.detach().cpu().contiguous().clone() for name, t in tensors.items()}
    save_file(tensors, os.path.join(output, "model.safetensors"), metadata={"format": "pt"})
    if tok is not None:
        write_tokenizer(tok, output, cfg.max_position_embeddings)
    return fmt, reader.path
