"""The weight mapping between megagopher's tensors and each Hugging Face architecture's, in both
directions: one place for the name and layout knowledge the export (hf.py) and the import (hf_import.py)
share.

``rules(fmt, cfg)`` (hf_rules.py, which joins these with hf_arch_recent.py's) lists ``Rule``s: our tensor
names, theirs, and two functions, ``to_theirs(*ours)`` and ``to_ours(*theirs)``, each the inverse of the
other. A name a side lacks reads as zeros where a zero tensor is the same function (a bias the format always
has, or a model without biases), see ``missing_bias_rows``. The layouts (our names: model/gpt.py):

  - Our fused QKV is laid out per query group, [q_g0 (heads/groups heads), k_g0, v_g0, q_g1, ...]. Llama
    takes separate q/k/v projections (query head h uses kv head h // (heads/groups), as ours). NeoX fuses
    per head, [q_h, k_h, v_h]: with one query head per group that *is* our layout. GPT-2's c_attn is
    [q; k; v] concatenated, stored transposed (Conv1D is x @ W). CodeGen's qkv_proj is cut into mp_num = 4
    blocks (the model-parallel shards it was trained with), each [q, v, k] of heads/4 heads.
  - RoPE: ours is the rotate-half convention on the first rotary_dim channels of each head, as Llama's and
    NeoX's. CodeGen (GPT-J) rotates interleaved pairs (2i, 2i+1) ("rotate_every_two"); permuting the
    first rotary_dim rows of every q and k head to [0, 2, 4, ..., 1, 3, 5, ...] makes that rotate-half,
    and q.k is unchanged because q and k get the same permutation.
  - Our SwiGLU fc1 is the gate and up projections in one matrix, rows interleaved channel by channel
    [gate_0, up_0, gate_1, up_1, ...] (model/gpt.py MLP): Llama's gate_proj is its even rows, up_proj its
    odd rows.
  - Parallel residual uses one input norm for both branches (GPT-J, CodeGen's ln_1); NeoX has one per
    branch, so the norm is written twice, and read back only when both copies are equal.
  - CodeGen's attention has no biases: ours must be zero to be exported, and are zero when imported.
  - Tied embeddings have no separate output matrix. The vocabulary is the real one (no TP padding).
  - Mixtral is Llama's attention and norms with a MoE block in every layer. On disk (what transformers'
    save_pretrained writes, 4.x and 5.x, and the Hub's checkpoints) each layer has
    block_sparse_moe.gate.weight (E, h), our router.weight; and per expert e, block_sparse_moe.experts.e.
    w1.weight (ffn, h) = gate, w3.weight (ffn, h) = up, w2.weight (h, ffn) = down. Our experts.fc1.weight
    (E, 2 ffn, h) interleaves gate and up rows as the dense fc1 (GroupedExperts.forward: swiglu(y[0::2],
    y[1::2])): w1 of expert e is fc1[e, 0::2], w3 is fc1[e, 1::2]; w2 is experts.fc2.weight[e]. transformers
    5 loads that into mlp.gate.weight, mlp.experts.gate_up_proj (E, 2 ffn, h) = [w1; w3] (gate half first,
    concatenated, not interleaved) and mlp.experts.down_proj (E, h, ffn): a state dict in those names is
    read through ``unfuse_mixtral`` first. Both routers are softmax over the E experts, top-k, renormalised.
  - Qwen2, Qwen3, Mistral, Qwen3-MoE and DeepSeek-V3 (multi-head latent attention, MTP modules) are
    hf_arch_recent.py's, built on the helpers here.
"""
from typing import Callable, NamedTuple

import torch

# In the order the export tries them (hf.py choose_format). The 2024-2026 ones (qwen2 ... deepseek_v3) are
# hf_arch_recent.py's.
FORMATS = ("llama", "mistral", "qwen2", "qwen3", "gpt_neox", "gpt2", "codegen", "mixtral", "qwen3_moe", "deepseek_v3")
ARCHITECTURES = {"LlamaForCausalLM": "llama", "GPTNeoXForCausalLM": "gpt_neox", "GPT2LMHeadModel": "gpt2",
                 "CodeGenForCausalLM": "codegen", "MixtralForCausalLM": "mixtral", "Qwen2ForCausalLM": "qwen2",
                 "Qwen3ForCausalLM": "qwen3", "MistralForCausalLM": "mistral", "Qwen3MoeForCausalLM": "qwen3_moe",
                 "DeepseekV3ForCausalLM": "deepseek_v3"}
CODEGEN_MP_NUM = 4  # transformers' CodeGenAttention.mp_num
# Our activation -> their ACT2FN name, and back (gelu_fast and quick_gelu are other functions).
HF_ACT = {"gelu": "gelu_pytorch_tanh", "gelu_exact": "gelu", "swiglu": "silu"}
OUR_GELU = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu": "gelu_exact"}


class MappingError(ValueError):
    """The tensors of one side cannot be expressed exactly by the other's."""


class Rule(NamedTuple):
    ours: tuple
    theirs: tuple
    to_theirs: Callable
    to_ours: Callable


def _same(ours, theirs):
    return Rule((ours,), (theirs,), lambda t: (t,), lambda t: (t,))


def _transposed(ours, theirs):  # GPT-2's Conv1D weights are [in, out]
    return Rule((ours,), (theirs,), lambda t: (t.t(),), lambda t: (t.t(),))


def _linear(ours, theirs, biased=True):
    return [_same(f"{ours}.weight", f"{theirs}.weight")] + ([_same(f"{ours}.bias", f"{theirs}.bias")] if biased else [])


def _norm(cfg, ours, theirs):
    return _linear(ours, theirs, biased=cfg.normalization == "layernorm")


# -- fused layouts ------------------------------------------------------------------------------------------
def split_qkv(cfg, full):
    """q [heads * d, ...], k and v [groups * d, ...] from our fused projection ``full``."""
    g, d = cfg.num_query_groups, cfg.head_dim
    hpg = cfg.num_attention_heads // g
    grouped = full.reshape(g, hpg + 2, d, *full.shape[1:])
    rest = full.shape[1:]
    return (grouped[:, :hpg].reshape(g * hpg * d, *rest), grouped[:, hpg].reshape(g * d, *rest),
            grouped[:, hpg + 1].reshape(g * d, *rest))


def join_qkv(cfg, q, k, v):
    g, d = cfg.num_query_groups, cfg.head_dim
    rest = q.shape[1:]
    parts = (q.reshape(g, -1, d, *rest), k.reshape(g, 1, d, *rest), v.reshape(g, 1, d, *rest))
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def rotate_every_two_to_half(cfg):
    """Channel order that makes GPT-J's interleaved rotary pairs our rotate-half ones: our channel i is
    their channel perm[i] (within each head)."""
    r = cfg.rotary_dim
    return torch.cat([torch.arange(0, r, 2), torch.arange(1, r, 2), torch.arange(r, cfg.head_dim)])


def codegen_to_ours(cfg, w):
    """Our fused QKV (one query head per group) from CodeGen's qkv_proj rows [mp, (q, v, k), heads/mp, d]."""
    h, d, rest = cfg.num_attention_heads, cfg.head_dim, w.shape[1:]
    blocks = w.reshape(CODEGEN_MP_NUM, 3, h // CODEGEN_MP_NUM, d, *rest)
    perm = rotate_every_two_to_half(cfg)
    q, v, k = (blocks[:, i].reshape(h, d, *rest) for i in range(3))
    return torch.stack([q[:, perm], k[:, perm], v], dim=1).reshape(-1, *rest)


def codegen_from_ours(cfg, w):
    h, d, rest = cfg.num_attention_heads, cfg.head_dim, w.shape[1:]
    inverse = torch.argsort(rotate_every_two_to_half(cfg))
    heads = w.reshape(h, 3, d, *rest)
    q, k, v = heads[:, 0][:, inverse], heads[:, 1][:, inverse], heads[:, 2]
    blocks = [t.reshape(CODEGEN_MP_NUM, h // CODEGEN_MP_NUM, d, *rest) for t in (q, v, k)]
    return torch.stack(blocks, dim=1).reshape(-1, *rest)


def _qkv_split_rule(cfg, ours, theirs):
    return Rule((ours,), theirs, lambda t: split_qkv(cfg, t), lambda q, k, v: (join_qkv(cfg, q, k, v),))


def _gate_up_rule(ours, theirs):
    def to_ours(gate, up):
        return (torch.stack([gate, up], dim=1).reshape(-1, *gate.shape[1:]),)
    return Rule((ours,), theirs, lambda t: (t[0::2].contiguous(), t[1::2].contiguous()), to_ours)


def _twice(ours, first, second, layer):
    def to_ours(a, b):
        if not torch.equal(a, b):
            raise MappingError(f"layer {layer} has a parallel residual with two different norms ({first} != "
                               f"{second}); megagopher's parallel residual normalises once for both branches")
        return (a,)
    return Rule((ours,), (first, second), lambda t: (t, t), to_ours)


def _zero(ours, size):
    """Our tensor that the format lacks: exported only when zero, imported as zeros."""
    def to_theirs(t):
        if torch.count_nonzero(t):
            raise MappingError(f"{ours} is not zero and the format has no such tensor")
        return ()
    return Rule((ours,), (), to_theirs, lambda: (torch.zeros(size),))


# -- each architecture's rules -----------------------------------------------------------------------------
def _head(cfg, theirs):
    return [] if cfg.tie_embeddings else [_same("output_layer", theirs)]


def _llama(cfg):
    out = [_same("embedding.word.weight", "model.embed_tokens.weight")]
    parts = ("weight", "bias") if cfg.bias else ("weight",)
    for i in range(cfg.num_layers):
        p, o = f"layers.{i}.", f"model.layers.{i}."
        out += [_same(p + "input_norm.weight", o + "input_layernorm.weight"),
                _same(p + "post_attention_norm.weight", o + "post_attention_layernorm.weight")]
        for part in parts:
            qkv = tuple(f"{o}self_attn.{n}_proj.{part}" for n in "qkv")
            out += [_qkv_split_rule(cfg, f"{p}attention.qkv.{part}", qkv),
                    _same(f"{p}attention.proj.{part}", f"{o}self_attn.o_proj.{part}"),
                    _gate_up_rule(f"{p}mlp.fc1.{part}", (f"{o}mlp.gate_proj.{part}", f"{o}mlp.up_proj.{part}")),
                    _same(f"{p}mlp.fc2.{part}", f"{o}mlp.down_proj.{part}")]
    return out + [_same("final_norm.weight", "model.norm.weight")] + _head(cfg, "lm_head.weight")


def _neox(cfg):
    out = [_same("embedding.word.weight", "gpt_neox.embed_in.weight")]
    for i in range(cfg.num_layers):
        p, o = f"layers.{i}.", f"gpt_neox.layers.{i}."
        if cfg.parallel_residual:
            out += [_twice(p + f"input_norm.{part}", o + f"input_layernorm.{part}",
                           o + f"post_attention_layernorm.{part}", i) for part in ("weight", "bias")]
        else:
            out += _norm(cfg, p + "input_norm", o + "input_layernorm")
            out += _norm(cfg, p + "post_attention_norm", o + "post_attention_layernorm")
        # One query head per group: our [q_g, k_g, v_g] per group is NeoX's [q_h, k_h, v_h] per head.
        out += _linear(p + "attention.qkv", o + "attention.query_key_value")
        out += _linear(p + "attention.proj", o + "attention.dense")
        out += _linear(p + "mlp.fc1", o + "mlp.dense_h_to_4h") + _linear(p + "mlp.fc2", o + "mlp.dense_4h_to_h")
    return out + _norm(cfg, "final_norm", "gpt_neox.final_layer_norm") + _head(cfg, "embed_out.weight")


def _gpt2(cfg):
    def c_attn(t):
        return (torch.cat(split_qkv(cfg, t), dim=0).t(),)

    def c_attn_bias(t):
        return (torch.cat(split_qkv(cfg, t)),)

    def from_c_attn(t):
        return (join_qkv(cfg, *t.t().chunk(3, dim=0)),)

    def from_c_attn_bias(t):
        return (join_qkv(cfg, *t.chunk(3)),)

    out = [_same("embedding.word.weight", "transformer.wte.weight"),
           _same("embedding.position", "transformer.wpe.weight")]
    for i in range(cfg.num_layers):
        p, o = f"layers.{i}.", f"transformer.h.{i}."
        out += _norm(cfg, p + "input_norm", o + "ln_1") + _norm(cfg, p + "post_attention_norm", o + "ln_2")
        out += [Rule((p + "attention.qkv.weight",), (o + "attn.c_attn.weight",), c_attn, from_c_attn),
                Rule((p + "attention.qkv.bias",), (o + "attn.c_attn.bias",), c_attn_bias, from_c_attn_bias)]
        for ours, theirs in (("attention.proj", "attn.c_proj"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
            out += [_transposed(f"{p}{ours}.weight", f"{o}{theirs}.weight"),
                    _same(f"{p}{ours}.bias", f"{o}{theirs}.bias")]
    return out + _norm(cfg, "final_norm", "transformer.ln_f") + _head(cfg, "lm_head.weight")


def _codegen(cfg):
    qkv_rows = (cfg.num_attention_heads + 2 * cfg.num_query_groups) * cfg.head_dim
    out = [_same("embedding.word.weight", "transformer.wte.weight")]
    for i in range(cfg.num_layers):
        p, o = f"layers.{i}.", f"transformer.h.{i}."
        out += _norm(cfg, p + "input_norm", o + "ln_1")
        out += [Rule((p + "attention.qkv.weight",), (o + "attn.qkv_proj.weight",),
                     lambda t: (codegen_from_ours(cfg, t),), lambda t: (codegen_to_ours(cfg, t),)),
                _same(p + "attention.proj.weight", o + "attn.out_proj.weight")]
        if cfg.bias:
            out += [_zero(p + "attention.qkv.bias", qkv_rows), _zero(p + "attention.proj.bias", cfg.hidden_size)]
        out += _linear(p + "mlp.fc1", o + "mlp.fc_in") + _linear(p + "mlp.fc2", o + "mlp.fc_out")
    out += _norm(cfg, "final_norm", "transformer.ln_f") + _head(cfg, "lm_head.weight")
    return out + [_same("output_bias", "lm_head.bias")]


def _experts_rules(cfg, p, o):
    """One MoE layer: the router and the experts, per expert on their side (see the module docstring)."""
    e = cfg.num_experts
    w = [f"{o}block_sparse_moe.experts.{j}.w{n}.weight" for n in (1, 3, 2) for j in range(e)]

    def fc1_to_ours(*gate_up):  # gate_up: the E gates (w1), then the E ups (w3)
        gate, up = torch.stack(gate_up[:e]), torch.stack(gate_up[e:])
        return (torch.stack([gate, up], dim=2).reshape(e, -1, gate.shape[-1]),)

    def fc1_to_theirs(t):
        return tuple(t[j, 0::2].contiguous() for j in range(e)) + tuple(t[j, 1::2].contiguous() for j in range(e))

    fc1 = Rule((p + "mlp.experts.fc1.weight",), tuple(w[:2 * e]), fc1_to_theirs, fc1_to_ours)
    fc2 = Rule((p + "mlp.experts.fc2.weight",), tuple(w[2 * e:]), lambda t: tuple(t.unbind(0)),
               lambda *down: (torch.stack(down),))
    return [_same(p + "mlp.router.weight", o + "block_sparse_moe.gate.weight"), fc1, fc2]


def _mixtral(cfg):
    out = [_same("embedding.word.weight", "model.embed_tokens.weight")]
    for i in range(cfg.num_layers):
        p, o = f"layers.{i}.", f"model.layers.{i}."
        qkv = tuple(f"{o}self_attn.{n}_proj.weight" for n in "qkv")
        out += [_same(p + "input_norm.weight", o + "input_layernorm.weight"),
                _same(p + "post_attention_norm.weight", o + "post_attention_layernorm.weight"),
                _qkv_split_rule(cfg, f"{p}attention.qkv.weight", qkv),
                _same(f"{p}attention.proj.weight", f"{o}self_attn.o_proj.weight")]
        out += _experts_rules(cfg, p, o)
    return out + [_same("final_norm.weight", "model.norm.weight")] + _head(cfg, "lm_head.weight")


def unfuse_experts(theirs, gate, up, down, renames=()):
    """A state dict in transformers 5's in-memory expert names (mlp.experts.gate_up_proj with the gate half
    first, mlp.experts.down_proj) as a format's on-disk per-expert names: ``gate``, ``up``, ``down`` are
    templates of {layer} and {j}; ``renames``: (suffix, on-disk suffix) pairs for the other tensors. Other
    names, the on-disk ones included, pass through."""
    out = {}
    for name, t in theirs.items():
        layer, fused, rest = name.partition(".mlp.experts.")
        renamed = [name[:-len(suffix)] + disk for suffix, disk in renames if name.endswith(suffix)]
        if fused and rest == "gate_up_proj":
            halves = t.chunk(2, dim=1)
            for j in range(t.shape[0]):
                out[gate.format(layer=layer, j=j)], out[up.format(layer=layer, j=j)] = halves[0][j], halves[1][j]
        elif fused and rest == "down_proj":
            out.update({down.format(layer=layer, j=j): t[j] for j in range(t.shape[0])})
        elif renamed:
            out[renamed[0]] = t
        else:
            out[name] = t
    return out


def unfuse_mixtral(theirs):
    """Mixtral's transformers 5 in-memory names (mlp.gate too) as its on-disk block_sparse_moe ones."""
    experts = "{layer}.block_sparse_moe.experts.{j}."
    return unfuse_experts(theirs, experts + "w1.weight", experts + "w3.weight", experts + "w2.weight",
                          renames=((".mlp.gate.weight", ".block_sparse_moe.gate.weight"),))


RULES = {"llama": _llama, "gpt_neox": _neox, "gpt2": _gpt2, "codegen": _codegen, "mixtral": _mixtral}


def missing_bias_rows(name, shapes):
    """The size of a bias ``name`` that ``shapes`` ({name: shape} of one side's tensors) lacks while its
    weight is there (a format that always has the bias, or a model without one): the zeros that stand in
    for it are the same function. None when ``name`` is no such bias."""
    if name == "output_bias":
        weight = "output_layer" if "output_layer" in shapes else "embedding.word.weight"
    elif name == "lm_head.bias":
        weight = "lm_head.weight" if "lm_head.weight" in shapes else "transformer.wte.weight"
    elif name.endswith(".bias"):
        weight = name[:-len(".bias")] + ".weight"
    else:
        return None
    return int(shapes[weight][0]) if weight in shapes else None
