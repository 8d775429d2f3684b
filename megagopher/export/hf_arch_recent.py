"""The weight mapping of the 2024-2026 architectures (hf_arch.py's ``Rule``s, both ways): Qwen2, Qwen3,
Mistral, Qwen3-MoE and DeepSeek-V3, with the names transformers' save_pretrained writes (4.x and 5.x alike)
and the Hub's checkpoints use. Per layer i (their prefix model.layers.i., ours layers.i.):

  input_layernorm / post_attention_layernorm   input_norm / post_attention_norm
  self_attn.{q,k,v}_proj.weight (.bias: Qwen2)  attention.qkv.weight (.bias), laid out per query group
                                                (hf_arch.split_qkv / join_qkv, as Llama's)
  self_attn.q_norm / k_norm (Qwen3, Qwen3-MoE)  attention.q_norm / k_norm (one weight of head_dim)
  self_attn.o_proj.weight                       attention.proj.weight
  mlp.gate_proj / up_proj / down_proj           mlp.fc1 (gate and up rows interleaved) / mlp.fc2 (dense)
  mlp.gate.weight                               mlp.router.weight (MoE layers)
  mlp.gate.e_score_correction_bias (DeepSeek)   mlp.router.expert_bias (the selection bias, fp32)
  mlp.experts.e.{gate,up,down}_proj.weight      mlp.experts.fc1[e] (interleaved) / mlp.experts.fc2[e]
  mlp.shared_experts.{gate,up,down}_proj        mlp.shared.fc1 (interleaved) / mlp.shared.fc2 (DeepSeek)

transformers 5 holds the experts fused in memory (mlp.experts.gate_up_proj (E, 2 ffn, h) = [gate; up],
the gate half first, and mlp.experts.down_proj (E, h, ffn)): a state dict in those names is read through
``unfuse_qwen_experts`` first, as Mixtral's (hf_arch.unfuse_mixtral).

DeepSeek-V3 (``_deepseek``): the multi-head latent attention's tensors have transformers' names on both
sides (model/mla.py: self_attn.X is our attention.X, o_proj our proj). DeepSeek rotates interleaved pairs
(2i, 2i + 1) of the rope channels (config.json's rope_interleave, true in V3); ours rotate halves. Permuting
the rope rows of every query head (q_b_proj, or q_proj without a query latent) and of the shared rope key
(the last qk_rope_head_dim rows of kv_a_proj_with_mqa) to [0, 2, 4, ..., 1, 3, 5, ...] turns one into the
other exactly: transformers' rotated output is [even pairs' first, ..., their second] channels, which is
what rotate-half makes of the permuted rows, and q.k is the same sum. With rope_interleave false no rows move.
"""
import torch

from megagopher.export.hf_arch import (MappingError, Rule, _gate_up_rule, _head, _qkv_split_rule, _same,
                                       unfuse_experts)

MTP_FILE = "mtp.safetensors"  # DeepSeek-V3's MTP modules, beside the model (hf.py's docstring)


def _attention(cfg, p, o, fmt):
    qkv = tuple(f"{o}self_attn.{n}_proj.weight" for n in "qkv")
    out = [_same(p + "input_norm.weight", o + "input_layernorm.weight"),
           _same(p + "post_attention_norm.weight", o + "post_attention_layernorm.weight"),
           _qkv_split_rule(cfg, p + "attention.qkv.weight", qkv),
           _same(p + "attention.proj.weight", o + "self_attn.o_proj.weight")]
    if fmt == "qwen2":
        biases = tuple(f"{o}self_attn.{n}_proj.bias" for n in "qkv")
        out.append(_qkv_split_rule(cfg, p + "attention.qkv.bias", biases))
    if fmt in ("qwen3", "qwen3_moe"):
        out += [_same(p + "attention.q_norm.weight", o + "self_attn.q_norm.weight"),
                _same(p + "attention.k_norm.weight", o + "self_attn.k_norm.weight")]
    return out


def dense_mlp(p, o):
    return [_gate_up_rule(p + "fc1.weight", (o + "gate_proj.weight", o + "up_proj.weight")),
            _same(p + "fc2.weight", o + "down_proj.weight")]


def experts_rules(cfg, p, o):
    """One MoE layer's router and routed experts: ours p + mlp.*, theirs o + mlp.* (per expert on disk)."""
    e = cfg.num_experts
    names = [f"{o}mlp.experts.{j}.{n}_proj.weight" for n in ("gate", "up", "down") for j in range(e)]

    def fc1_to_ours(*gate_up):  # the E gates, then the E ups
        gate, up = torch.stack(gate_up[:e]), torch.stack(gate_up[e:])
        return (torch.stack([gate, up], dim=2).reshape(e, -1, gate.shape[-1]),)

    def fc1_to_theirs(t):
        return tuple(t[j, 0::2].contiguous() for j in range(e)) + tuple(t[j, 1::2].contiguous() for j in range(e))

    return [_same(p + "mlp.router.weight", o + "mlp.gate.weight"),
            Rule((p + "mlp.experts.fc1.weight",), tuple(names[:2 * e]), fc1_to_theirs, fc1_to_ours),
            Rule((p + "mlp.experts.fc2.weight",), tuple(names[2 * e:]), lambda t: tuple(t.unbind(0)),
                 lambda *down: (torch.stack(down),))]


def _layer(cfg, i, fmt, p, o):
    out = _attention(cfg, p, o, fmt)
    if not cfg.is_moe_layer(i):
        return out + dense_mlp(p + "mlp.", o + "mlp.")
    return out + experts_rules(cfg, p, o)


def _llama_family(fmt):
    def build(cfg, **options):
        out = [_same("embedding.word.weight", "model.embed_tokens.weight")]
        for i in range(cfg.num_layers):
            out += _layer(cfg, i, fmt, f"layers.{i}.", f"model.layers.{i}.")
        return out + [_same("final_norm.weight", "model.norm.weight")] + _head(cfg, "lm_head.weight")
    return build


def unfuse_qwen_experts(theirs):
    """Qwen3-MoE's / DeepSeek's transformers 5 in-memory expert names as the on-disk per-expert ones."""
    experts = "{layer}.mlp.experts.{j}."
    return unfuse_experts(theirs, experts + "gate_proj.weight", experts + "up_proj.weight",
                          experts + "down_proj.weight")


# -- DeepSeek-V3 ------------------------------------------------------------------------------------------------
def rope_rows(width, rope, interleaved):
    """The row order of a block of ``width`` rows whose last ``rope`` are rotated: ours row i is their row
    order[i] (hf_arch.rotate_every_two_to_half's permutation on the rope rows; identity when not interleaved)."""
    head = torch.arange(width - rope)
    if not interleaved:
        return torch.arange(width)
    return torch.cat([head, width - rope + torch.arange(0, rope, 2), width - rope + torch.arange(1, rope, 2)])


def _permuted(ours, theirs, order):
    """A weight whose rows are ``order`` of theirs (blocks of len(order) rows, one per head)."""
    inverse = torch.argsort(order)

    def to_ours(t):
        return (t.reshape(-1, len(order), *t.shape[1:])[:, order].reshape(t.shape),)

    def to_theirs(t):
        return (t.reshape(-1, len(order), *t.shape[1:])[:, inverse].reshape(t.shape),)
    return Rule((ours,), (theirs,), to_theirs, to_ours)


def mla_rules(cfg, p, o, interleaved):
    """One layer's latent attention (model/mla.py names) and its norms."""
    a, s, rot = p + "attention.", o + "self_attn.", cfg.qk_rope_head_dim
    q = rope_rows(cfg.head_dim, rot, interleaved)
    out = [_same(p + "input_norm.weight", o + "input_layernorm.weight"),
           _same(p + "post_attention_norm.weight", o + "post_attention_layernorm.weight"),
           _permuted(a + "kv_a_proj_with_mqa.weight", s + "kv_a_proj_with_mqa.weight",
                     rope_rows(cfg.kv_lora_rank + rot, rot, interleaved)),
           _same(a + "kv_a_layernorm.weight", s + "kv_a_layernorm.weight"),
           _same(a + "kv_b_proj.weight", s + "kv_b_proj.weight"),
           _same(a + "proj.weight", s + "o_proj.weight")]
    if cfg.q_lora_rank:
        out += [_same(a + "q_a_proj.weight", s + "q_a_proj.weight"),
                _same(a + "q_a_layernorm.weight", s + "q_a_layernorm.weight"),
                _permuted(a + "q_b_proj.weight", s + "q_b_proj.weight", q)]
    else:
        out.append(_permuted(a + "q_proj.weight", s + "q_proj.weight", q))
    return out


def deepseek_layer(cfg, i, p, o, interleaved):
    out = mla_rules(cfg, p, o, interleaved)
    if not cfg.is_moe_layer(i):
        return out + dense_mlp(p + "mlp.", o + "mlp.")
    out += experts_rules(cfg, p, o) + [_same(p + "mlp.router.expert_bias", o + "mlp.gate.e_score_correction_bias")]
    if cfg.moe_shared_experts:
        out += dense_mlp(p + "mlp.shared.", o + "mlp.shared_experts.")
    return out


def _copy(ours, main, copy):
    """A tensor the format stores twice (an MTP module's copy of the shared embedding or head): written to
    both, read from the main one after checking the copy equals it."""
    def to_ours(a, b):
        if not torch.equal(a, b):
            raise MappingError(f"{copy} differs from {main}: megagopher's MTP modules share the model's")
        return (a,)
    return Rule((ours,), (main, copy), lambda t: (t, t), to_ours)


def mtp_rules(cfg, interleaved):
    """The MTP modules (model/mtp.py): ours mtp.layers.{j}.*, theirs model.layers.{j}.* for j = L .. L + D - 1,
    DeepSeek's published names (hf.py's docstring)."""
    out, head = [], "embedding.word.weight" if cfg.tie_embeddings else "output_layer"
    main_head = "model.embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight"
    for j in range(cfg.num_layers, cfg.num_layers + cfg.mtp_num_layers):
        p, o = f"mtp.layers.{j}.", f"model.layers.{j}."
        out += [_same(p + "enorm.weight", o + "enorm.weight"), _same(p + "hnorm.weight", o + "hnorm.weight"),
                _same(p + "eh_proj", o + "eh_proj.weight"),
                _same(p + "final_norm.weight", o + "shared_head.norm.weight"),
                _copy("embedding.word.weight", "model.embed_tokens.weight", o + "embed_tokens.weight"),
                _copy(head, main_head, o + "shared_head.head.weight")]
        out += deepseek_layer(cfg, j, p + "layer.", o, interleaved)
    return out


def is_mtp_name(cfg, name):
    """Whether ``name`` (theirs) is an MTP module's: a layer index >= num_layers."""
    head, _, rest = name.partition("model.layers.")
    return not head and int(rest.split(".", 1)[0]) >= cfg.num_layers if rest else False


def _deepseek(cfg, rope_interleave=True):
    out = [_same("embedding.word.weight", "model.embed_tokens.weight")]
    for i in range(cfg.num_layers):
        out += deepseek_layer(cfg, i, f"layers.{i}.", f"model.layers.{i}.", rope_interleave)
    out += [_same("final_norm.weight", "model.norm.weight")] + _head(cfg, "lm_head.weight")
    return out + mtp_rules(cfg, rope_interleave)


RULES = {**{fmt: _llama_family(fmt) for fmt in ("qwen2", "qwen3", "mistral", "qwen3_moe")}, "deepseek_v3": _deepseek}
