"""A Hugging Face config.json read as megagopher's ``[model]`` (the import's half of the config mapping;
hf.py's ``hf_config`` writes it). Only what the model computes exactly is accepted: anything else (dynamic
RoPE scaling, an activation we do not have, attention that scales otherwise...) is an HFImportError naming
the key, never an approximation.

transformers 5 writes RoPE as ``rope_parameters`` ({rope_type, rope_theta, partial_rotary_factor}),
4.x as rope_theta / rope_scaling / rotary_pct / rotary_emb_base: both are read. A key config.json omits
takes transformers' default for that architecture (``DEFAULTS``; the tests compare them with its classes).
Mixtral is read as Llama's attention plus experts in every layer (``_mixtral``). The architectures of
2024-2026 (Llama's rope_scaling, Qwen2, Qwen3, Mistral, Qwen3-MoE, DeepSeek-V3) are hf_config_recent.py's,
over the Llama-family keys read here.
"""
from megagopher.config.fields import ConfigError
from megagopher.export import hf_config_recent as recent
from megagopher.export.hf_arch import ARCHITECTURES, CODEGEN_MP_NUM, OUR_GELU
from megagopher.model import GPTConfig

# transformers' defaults of the keys read below, per architecture.
DEFAULTS = {
    "llama": {"hidden_act": "silu", "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "attention_bias": False,
              "mlp_bias": False, "max_position_embeddings": 2048, "num_key_value_heads": None, "head_dim": None,
              "initializer_range": 0.02},
    "gpt_neox": {"hidden_act": "gelu", "layer_norm_eps": 1e-5, "tie_word_embeddings": False, "attention_bias": True,
                 "use_parallel_residual": True, "max_position_embeddings": 2048, "initializer_range": 0.02},
    "gpt2": {"activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True,
             "n_inner": None, "n_positions": 1024, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
             "add_cross_attention": False, "initializer_range": 0.02},
    "codegen": {"activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "tie_word_embeddings": False,
                "n_inner": None, "n_positions": 2048, "rotary_dim": 64, "initializer_range": 0.02},
    "mixtral": {"hidden_act": "silu", "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
                "max_position_embeddings": 131072, "num_key_value_heads": 8, "head_dim": None,
                "initializer_range": 0.02, "sliding_window": None, "num_local_experts": 8, "num_experts_per_tok": 2,
                "router_aux_loss_coef": 0.001},
    **recent.DEFAULTS,
}

_ROPE_KEYS = {"rope_type", "rope_theta", "partial_rotary_factor"}


class HFImportError(ValueError):
    """A Hugging Face model megagopher cannot express exactly (the message names the feature)."""


def architecture_of(hf, where):
    """Our name for the architecture of config.json ``hf``."""
    names = hf.get("architectures") or []
    found = [ARCHITECTURES[n] for n in names if n in ARCHITECTURES]
    if not found:
        raise HFImportError(f"{where}: architectures = {names!r} is not supported; supported: "
                            f"{', '.join(ARCHITECTURES)}")
    return found[0]


def _rope(hf, get, where):
    """(rope_theta, partial rotary factor) from either form; HFImportError for any scaling."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling")
    if scaling:
        params.update(scaling)
    kind = params.get("rope_type", params.get("type", "default"))
    extra = sorted(set(params) - _ROPE_KEYS - {"type"})
    if kind != "default" or extra:
        raise HFImportError(f"{where}: rope_scaling / rope_parameters {params!r} is not supported (megagopher's "
                            "rotary embedding has no scaling: rope_type 'default' only)")
    theta = params.get("rope_theta", get("rope_theta", get("rotary_emb_base", 10000.0)))
    factor = params.get("partial_rotary_factor", get("rotary_pct", 1.0))
    return float(theta), float(factor)


def _activation(name, where, key):
    if name not in OUR_GELU:
        raise HFImportError(f"{where}: {key} = {name!r} is not supported; supported: {', '.join(OUR_GELU)}")
    return OUR_GELU[name]


def _need(ok, where, text):
    if not ok:
        raise HFImportError(f"{where}: {text}")


def model_config(hf, where):
    """(format, GPTConfig) of config.json ``hf`` (a dict); ``where`` names the file in errors."""
    fmt = architecture_of(hf, where)
    defaults = DEFAULTS[fmt]

    def get(key, default=None):
        value = hf.get(key, defaults.get(key, default))
        return defaults.get(key, default) if value is None and key in defaults else value

    kw = {"vocab_size": hf["vocab_size"], "tie_embeddings": bool(get("tie_word_embeddings")),
          "init_std": float(get("initializer_range")), "dropout": 0.0}
    if fmt == "llama":
        kw.update(_llama(hf, get, where))
    elif fmt == "gpt_neox":
        kw.update(_neox(hf, get, where))
    elif fmt == "gpt2":
        kw.update(_gpt2(hf, get, where))
    elif fmt == "mixtral":
        kw.update(_mixtral(hf, get, where))
    elif fmt == "codegen":
        kw.update(_codegen(hf, get, where))
    else:
        try:
            kw.update(recent.read_recent(fmt, hf, get, _llama(hf, get, where, fmt)))
        except recent.ConfigProblem as e:
            raise HFImportError(f"{where}: {e}") from None
    rotary_dim = kw.pop("_rotary_dim", None)
    kw["seq_length"] = kw["max_position_embeddings"]
    try:
        cfg = GPTConfig(**kw)
    except ConfigError as e:  # a combination our [model] refuses (e.g. a rope_scaling table's numbers)
        raise HFImportError(f"{where}: {e}") from None
    if rotary_dim is not None:
        _need(cfg.rotary_dim == rotary_dim, where, f"rotates {rotary_dim} channels of head_dim {cfg.head_dim}; "
              "megagopher rotates an even number of channels (rotary_percent)")
    return fmt, cfg


def _llama(hf, get, where, fmt="llama"):
    """The Llama-family keys (Llama, Mixtral, Qwen2/3, Mistral, Qwen3-MoE, DeepSeek-V3's sizes and norms)."""
    h, heads = hf["hidden_size"], hf["num_attention_heads"]
    _need(get("hidden_act") == "silu", where, f"hidden_act = {get('hidden_act')!r} is not supported (SwiGLU "
          "is silu(gate) * up)")
    try:
        theta, factor, scaling = recent.read_rope(hf, get, mla=fmt == "deepseek_v3")
    except recent.ConfigProblem as e:
        raise HFImportError(f"{where}: {e}") from None
    _need(factor == 1.0, where, f"partial_rotary_factor = {factor}: {fmt}'s export rotates the whole head")
    head_dim = get("head_dim")
    return {"num_layers": hf["num_hidden_layers"], "hidden_size": h, "num_attention_heads": heads,
            "num_query_groups": get("num_key_value_heads") or heads, "ffn_hidden_size": hf["intermediate_size"],
            "normalization": "rmsnorm", "activation": "swiglu", "position_embedding": "rope", "rope_theta": theta,
            "rope_scaling": scaling, "kv_channels": head_dim if head_dim not in (None, h // heads) else 0,
            "max_position_embeddings": get("max_position_embeddings"), "norm_epsilon": float(get("rms_norm_eps")),
            # One switch for every linear: a side without biases reads as zeros (the same function).
            "bias": bool(get("attention_bias") or get("mlp_bias"))}


def _mixtral(hf, get, where):
    """Llama's attention without biases (Mixtral has none) and a MoE block in every layer: softmax over
    the experts, top-k renormalised, dropless (transformers' MixtralSparseMoeBlock is ours exactly).
    router_jitter_noise, like dropout, only perturbs training and is not kept. Our export's "megagopher"
    table gives back what Mixtral has no key for (hf.py's _mixtral_config)."""
    window = get("sliding_window")
    _need(window is None or window >= get("max_position_embeddings"), where, f"sliding_window = {window} is "
          "not supported (megagopher's attention is full causal)")
    kw = _llama(hf, get, where)
    experts, top_k = get("num_local_experts"), get("num_experts_per_tok")
    _need(0 < top_k <= experts, where, f"num_experts_per_tok = {top_k} is not in [1, num_local_experts = "
          f"{experts}]")
    ours, ffn = hf.get("megagopher") or {}, kw["ffn_hidden_size"]
    return {**kw, "bias": False, "num_experts": experts, "moe_top_k": top_k, "moe_ffn_hidden_size": ffn,
            "ffn_hidden_size": ours.get("ffn_hidden_size", ffn),
            "moe_layer_freq": 1, "moe_shared_experts": 0, "moe_router": "softmax", "moe_capacity_factor": 0.0,
            "moe_aux_loss_coeff": float(get("router_aux_loss_coef")),
            "moe_z_loss_coeff": float(ours.get("moe_z_loss_coeff", 0.0))}


def _neox(hf, get, where):
    h, heads = hf["hidden_size"], hf["num_attention_heads"]
    theta, factor = _rope(hf, get, where)
    return {"num_layers": hf["num_hidden_layers"], "hidden_size": h, "num_attention_heads": heads,
            "ffn_hidden_size": hf["intermediate_size"], "normalization": "layernorm",
            "activation": _activation(get("hidden_act"), where, "hidden_act"), "position_embedding": "rope",
            "rotary_percent": factor, "rope_theta": theta, "_rotary_dim": int(h // heads * factor),
            "max_position_embeddings": get("max_position_embeddings"), "norm_epsilon": float(get("layer_norm_eps")),
            "parallel_residual": bool(get("use_parallel_residual")), "bias": True}


def _gpt2(hf, get, where):
    _need(get("scale_attn_weights"), where, "scale_attn_weights = false (unscaled attention) is not supported")
    _need(not get("scale_attn_by_inverse_layer_idx"), where, "scale_attn_by_inverse_layer_idx = true is not supported")
    _need(not get("add_cross_attention"), where, "add_cross_attention = true is not supported (a decoder only)")
    h = hf["n_embd"]
    return {"num_layers": hf["n_layer"], "hidden_size": h, "num_attention_heads": hf["n_head"],
            "ffn_hidden_size": get("n_inner") or 4 * h, "normalization": "layernorm",
            "activation": _activation(get("activation_function"), where, "activation_function"),
            "position_embedding": "learned", "max_position_embeddings": get("n_positions"),
            "norm_epsilon": float(get("layer_norm_epsilon")), "bias": True}


def _codegen(hf, get, where):
    h, heads, rotary = hf["n_embd"], hf["n_head"], get("rotary_dim")
    _need(rotary is not None, where, "rotary_dim = null (rotary tables over the whole hidden size) is not "
          "supported")
    _need(heads % CODEGEN_MP_NUM == 0, where, f"n_head = {heads} is not divisible by CodeGen's mp_num "
          f"{CODEGEN_MP_NUM} (its qkv_proj layout)")
    _need(0 < rotary <= h // heads, where, f"rotary_dim = {rotary} is not in (0, head_dim = {h // heads}]")
    return {"num_layers": hf["n_layer"], "hidden_size": h, "num_attention_heads": heads,
            "ffn_hidden_size": get("n_inner") or 4 * h, "normalization": "layernorm",
            "activation": _activation(get("activation_function"), where, "activation_function"),
            "position_embedding": "rope", "rotary_percent": rotary / (h // heads), "_rotary_dim": rotary,
            "rope_theta": 10000.0, "max_position_embeddings": get("n_positions"),
            "norm_epsilon": float(get("layer_norm_epsilon")), "parallel_residual": True,
            # Biased MLP and head; the attention has none, imported as zero biases.
            "bias": True, "output_bias": True}
