"""config.json of the 2024-2026 architectures, both ways: Llama's RoPE scaling (Llama 3.1/3.2), Qwen2,
Qwen3, Mistral, Qwen3-MoE and DeepSeek-V3 (transformers' Qwen2Config, Qwen3Config, MistralConfig,
Qwen3MoeConfig, DeepseekV3Config), read as megagopher's ``[model]`` and written back.

What each reads as (the weights are hf_arch_recent.py's):

  RoPE scaling     rope_parameters (transformers 5) or rope_scaling (4.x), rope_type / type 'llama3' or
                   'linear' (every Llama-family format) and 'yarn' (DeepSeek-V3) -> model.rope_scaling with
                   transformers' own factor names; any other type (dynamic, longrope, ...) is refused.
  head_dim         -> model.kv_channels when it is not hidden_size / num_attention_heads.
  Qwen2            q, k, v biases only -> model.qkv_bias; o_proj and the MLP have none.
  Qwen3            per-head RMSNorm of q and k -> model.qk_norm; attention_bias (on o_proj too) refused.
  sliding windows  Mistral's sliding_window (every layer), Qwen2/Qwen3's use_sliding_window with
                   layer_types (or max_window_layers: layer i slides when i >= max_window_layers) and
                   Qwen3-MoE's (every layer) -> model.window_size and a per-layer window_pattern (the
                   shortest cycle of the layer list). transformers' mask lets query i see keys
                   i - sliding_window + 1 .. i (masking_utils.sliding_window_overlay), ours exactly.
  Qwen3-MoE        softmax router, top-k renormalised or not (norm_topk_prob -> moe_norm_topk_prob); a
                   layer is sparse unless in mlp_only_layers and when (i + 1) % decoder_sparse_step == 0:
                   read as first_k_dense / moe_layer_freq when that rule gives the same layers, else
                   refused; written back as decoder_sparse_step 1 with mlp_only_layers listing the dense ones.
  DeepSeek-V3      MLA ranks and head dims, sigmoid routing with e_score_correction_bias, n_group /
                   topk_group, routed_scaling_factor, norm_topk_prob, first_k_dense_replace,
                   n_shared_experts; num_mtp_layers is how many MTP modules the weights carry.

What a format has no key for but our [model] needs for a round trip (the z-loss, the aux-loss
coefficients of routing we train with, the dense width of an all-MoE model) rides in config.json's
"megagopher" table, as Mixtral's does (hf.py).
"""
from megagopher.config.model import ROPE_SCALING_KEYS

# Per format: (transformers' architecture name, model_type).
RECENT = {"qwen2": ("Qwen2ForCausalLM", "qwen2"), "qwen3": ("Qwen3ForCausalLM", "qwen3"),
          "mistral": ("MistralForCausalLM", "mistral"), "qwen3_moe": ("Qwen3MoeForCausalLM", "qwen3_moe"),
          "deepseek_v3": ("DeepseekV3ForCausalLM", "deepseek_v3")}
# transformers' defaults of the keys read below (its config classes; test_hf_oracle_arch compares them).
DEFAULTS = {
    "qwen2": {"hidden_act": "silu", "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
              "max_position_embeddings": 32768,
              "num_key_value_heads": 32, "initializer_range": 0.02, "use_sliding_window": False, "sliding_window": 4096,
              "max_window_layers": 28, "layer_types": None},
    "qwen3": {"hidden_act": "silu", "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
              "max_position_embeddings": 32768,
              "num_key_value_heads": 32, "head_dim": 128, "initializer_range": 0.02, "attention_bias": False,
              "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28, "layer_types": None},
    "mistral": {"hidden_act": "silu", "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                "max_position_embeddings": 131072, "num_key_value_heads": 8, "head_dim": None,
                "initializer_range": 0.02, "sliding_window": 4096},
    "qwen3_moe": {"hidden_act": "silu", "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                  "max_position_embeddings": 32768, "num_key_value_heads": 4, "head_dim": None,
                  "initializer_range": 0.02, "attention_bias": False, "use_sliding_window": False,
                  "sliding_window": 4096, "decoder_sparse_step": 1, "moe_intermediate_size": 768,
                  "num_experts_per_tok": 8, "num_experts": 128, "norm_topk_prob": False, "router_aux_loss_coef": 0.001,
                  "mlp_only_layers": None},
    "deepseek_v3": {"hidden_act": "silu", "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                    "max_position_embeddings": 4096, "num_key_value_heads": None, "initializer_range": 0.02,
                    "attention_bias": False, "n_shared_experts": 1, "n_routed_experts": 256,
                    "routed_scaling_factor": 2.5,
                    "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128,
                    "qk_nope_head_dim": 128, "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8,
                    "first_k_dense_replace": 3, "norm_topk_prob": True, "rope_interleave": True,
                    "moe_intermediate_size": 2048},
}
# transformers' keys of a rope table that are not scaling factors.
_PLAIN_ROPE = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}


class ConfigProblem(ValueError):
    """A config.json key megagopher cannot compute exactly (hf_config turns it into an HFImportError)."""


def _need(ok, text):
    if not ok:
        raise ConfigProblem(text)


# -- RoPE ----------------------------------------------------------------------------------------------------
def read_rope(hf, get, kinds=("linear", "llama3", "yarn"), mla=False):
    """(rope_theta, partial rotary factor, our rope_scaling table) from either of transformers' forms;
    ``kinds``: the scaling types the format may carry; ``mla``: DeepSeek's attention, whose softmax scale
    takes YaRN's mscale_all_dim (yarn_apply_mscale), which the Llama-family attentions ignore."""
    params = dict(hf.get("rope_parameters") or {})
    params.update(hf.get("rope_scaling") or {})
    kind = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", get("rope_theta", get("rotary_emb_base", 10000.0))))
    factor = float(params.get("partial_rotary_factor", get("rotary_pct", 1.0)))
    extra = {k: v for k, v in params.items() if k not in _PLAIN_ROPE}
    if kind == "default":
        _need(not extra, f"rope_parameters {params!r}: rope_type 'default' with scaling keys {sorted(extra)}")
        return theta, factor, {}
    _need(kind in kinds, f"rope_scaling / rope_parameters rope_type {kind!r} is not supported for this "
          f"architecture; supported: 'default'{''.join(', ' + repr(k) for k in kinds)}")
    if kind == "yarn":
        extra = _yarn(extra, get)
        _need(mla or not extra["mscale_all_dim"], f"rope_parameters mscale_all_dim = {extra['mscale_all_dim']} "
              "is not supported here: megagopher scales the softmax by it (DeepSeek's attention), this "
              "architecture's attention does not")
    unknown = sorted(set(extra) - set(ROPE_SCALING_KEYS[kind]))
    _need(not unknown, f"rope_scaling / rope_parameters {kind!r} key(s) {unknown} are not supported; "
          f"supported: {', '.join(ROPE_SCALING_KEYS[kind])}")
    missing = [k for k, default in ROPE_SCALING_KEYS[kind].items() if default is None and extra.get(k) is None]
    _need(not missing, f"rope_scaling / rope_parameters {kind!r} lacks {', '.join(missing)}")
    return theta, factor, {"type": kind, **{k: float(v) for k, v in extra.items()}}


def _yarn(extra, get):
    """transformers' YaRN table as ours: its None-means-default keys resolved as _compute_yarn_parameters
    resolves them (factor from the lengths, beta_* by ``or``, mscale counted only with mscale_all_dim)."""
    extra = dict(extra)
    truncate = extra.pop("truncate", True)
    _need(truncate in (True, None), "rope_parameters truncate = false (YaRN's unrounded correction range) is not "
          "supported")
    _need(extra.pop("attention_factor", None) is None, "rope_parameters attention_factor (a YaRN attention scale "
          "set by hand) is not supported: megagopher derives it from factor, mscale and mscale_all_dim")
    if extra.get("factor") is None and extra.get("original_max_position_embeddings"):
        extra["factor"] = get("max_position_embeddings") / extra["original_max_position_embeddings"]
    extra["beta_fast"] = extra.get("beta_fast") or 32.0
    extra["beta_slow"] = extra.get("beta_slow") or 1.0
    both = extra.get("mscale") and extra.get("mscale_all_dim")
    extra["mscale"] = extra["mscale"] if both else 1.0
    extra["mscale_all_dim"] = extra.get("mscale_all_dim") or 0.0
    return extra


def write_rope(cfg, partial=None):
    """rope_parameters of ``cfg`` (transformers 5), with its scaling table under transformers' names."""
    out = {"rope_type": "default", "rope_theta": float(cfg.rope_theta)}
    if partial is not None:
        out["partial_rotary_factor"] = partial
    if cfg.rope_scaling:
        table = {k: v for k, v in cfg.rope_scaling.items() if k != "type"}
        out.update(rope_type=cfg.rope_scaling["type"], **table)
        for key in ("original_max_position_embeddings",):
            if key in out:
                out[key] = int(out[key])
    return out


def rope_legacy(cfg):
    """The 4.x form: rope_scaling (None when there is none)."""
    if not cfg.rope_scaling:
        return None
    table = write_rope(cfg)
    return {k: v for k, v in table.items() if k != "rope_theta"}


# -- sliding windows ------------------------------------------------------------------------------------------
def shortest_cycle(flags):
    """The shortest list p with flags[i] == p[i % len(p)] for every i (window_pattern repeats)."""
    for n in range(1, len(flags) + 1):
        if all(flags[i] == flags[i % n] for i in range(len(flags))):
            return flags[:n]
    return flags


def window_from_layer_types(layer_types, window, num_layers):
    """(window_size, window_pattern) of a per-layer list of 'sliding_attention' / 'full_attention'."""
    bad = sorted({t for t in layer_types} - {"sliding_attention", "full_attention"})
    _need(not bad, f"layer_types entries {bad} are not supported (sliding_attention / full_attention only)")
    _need(len(layer_types) == num_layers, f"layer_types has {len(layer_types)} entries for {num_layers} layers")
    local = ["local" if t == "sliding_attention" else "global" for t in layer_types]
    if window is None or "local" not in local:
        return 0, []
    pattern = shortest_cycle(local)
    return int(window), [] if pattern == ["local"] else pattern


def layer_types(cfg):
    return ["sliding_attention" if cfg.is_local_layer(i) else "full_attention" for i in range(cfg.num_layers)]


def qwen_window(get, num_layers):
    """Qwen2/Qwen3's sliding window: use_sliding_window gates it; layer_types (or max_window_layers) places it."""
    if not get("use_sliding_window") or get("sliding_window") is None:
        return 0, []
    types = get("layer_types")
    if types is None:
        types = ["sliding_attention" if i >= get("max_window_layers") else "full_attention" for i in range(num_layers)]
    return window_from_layer_types(types, get("sliding_window"), num_layers)


def write_window(cfg, fmt):
    """The sliding-window keys of config.json for ``fmt``."""
    if fmt == "mistral":
        return {"sliding_window": cfg.window_size or None}
    if fmt == "qwen3_moe":
        return {"use_sliding_window": bool(cfg.window_size), "sliding_window": cfg.window_size or None}
    on = bool(cfg.window_size)
    return {"use_sliding_window": on, "sliding_window": cfg.window_size or None, "max_window_layers": cfg.num_layers,
            "layer_types": layer_types(cfg) if on else None}


# -- MoE layer placement ----------------------------------------------------------------------------------------
def moe_placement(sparse, where_keys):
    """(first_k_dense, moe_layer_freq) whose is_moe_layer rule picks exactly the layers ``sparse`` (bools)."""
    n = len(sparse)
    for freq in range(1, n + 1):
        for first in range(n + 1):
            if all(sparse[i] == (i >= first and i % freq == 0) for i in range(n)):
                return first, freq
    raise ConfigProblem(f"{where_keys} make layers {[i for i, s in enumerate(sparse) if s]} sparse: megagopher's "
                        "MoE layers are those i >= first_k_dense with i % moe_layer_freq == 0")


# -- config.json -> [model] ---------------------------------------------------------------------------------------
def read_recent(fmt, hf, get, llama):
    """[model] keys of the recent format ``fmt``; ``llama``: the Llama-family keys hf_config read already
    (sizes, norms, SwiGLU, RoPE with its scaling, kv_channels)."""
    ours = hf.get("megagopher") or {}
    if fmt == "deepseek_v3":
        return _deepseek(hf, get, llama, ours)
    _need(not get("attention_bias"), f"attention_bias = true is not supported ({fmt} puts it on o_proj too; "
          "megagopher's model.qkv_bias biases q, k, v only)")
    kw = {**llama, "bias": False}
    layers = kw["num_layers"]
    if fmt == "qwen2":
        window = qwen_window(get, layers)
        kw["qkv_bias"] = True
    elif fmt == "qwen3":
        window = qwen_window(get, layers)
        kw["qk_norm"] = True
    elif fmt == "mistral":
        window = (int(get("sliding_window") or 0), [])
    else:
        window = (int(get("sliding_window") or 0) if get("use_sliding_window") else 0, [])
        kw.update(qk_norm=True, **_qwen3_moe(hf, get, kw, ours))
    kw["window_size"], kw["window_pattern"] = window
    return kw


def _qwen3_moe(hf, get, kw, ours):
    # transformers 5 saves num_experts as num_local_experts (Qwen3MoeConfig.attribute_map), 4.x as itself.
    experts = hf.get("num_experts", hf.get("num_local_experts")) or get("num_experts")
    top_k, step = get("num_experts_per_tok"), get("decoder_sparse_step")
    _need(experts > 0 and 0 < top_k <= experts, f"num_experts_per_tok = {top_k} is not in [1, num_experts = "
          f"{experts}]")
    dense = set(get("mlp_only_layers") or [])
    sparse = [i not in dense and (i + 1) % step == 0 for i in range(kw["num_layers"])]
    first, freq = moe_placement(sparse, f"decoder_sparse_step = {step}, mlp_only_layers = {sorted(dense)}")
    return {"num_experts": experts, "moe_top_k": top_k, "moe_ffn_hidden_size": get("moe_intermediate_size"),
            "moe_layer_freq": freq, "first_k_dense": first, "moe_shared_experts": 0, "moe_router": "softmax",
            "moe_norm_topk_prob": bool(get("norm_topk_prob")), "moe_capacity_factor": 0.0,
            "moe_aux_loss_coeff": float(get("router_aux_loss_coef")),
            "moe_z_loss_coeff": float(ours.get("moe_z_loss_coeff", 0.0)),
            "moe_seq_aux_loss_coeff": float(ours.get("moe_seq_aux_loss_coeff", 0.0))}


def _deepseek(hf, get, llama, ours):
    heads = hf["num_attention_heads"]
    _need(not get("attention_bias"), "attention_bias = true is not supported (megagopher's MLA has no biases)")
    # MLA expands the latent to every head: transformers' key/value groups (heads // num_key_value_heads) must
    # not repeat them (V3's config has 128 of 128; its class's default 128 makes a small model's 0 groups).
    kv_heads = get("num_key_value_heads") or heads
    _need(kv_heads >= heads, f"num_key_value_heads = {kv_heads} < num_attention_heads = {heads} (MLA has a key "
          "and value per head)")
    experts, top_k = hf.get("n_routed_experts", hf.get("num_local_experts")) or get("n_routed_experts"), \
        get("num_experts_per_tok")
    _need(0 < top_k <= experts, f"num_experts_per_tok = {top_k} is not in [1, n_routed_experts = {experts}]")
    kw = {k: v for k, v in llama.items() if k != "kv_channels"}
    # q_lora_rank null means a full query projection (not the default 1536): read as written.
    q_lora = hf.get("q_lora_rank", DEFAULTS["deepseek_v3"]["q_lora_rank"]) or 0
    kw.update(bias=False, num_query_groups=heads, q_lora_rank=q_lora, kv_lora_rank=get("kv_lora_rank"),
              qk_nope_head_dim=get("qk_nope_head_dim"), qk_rope_head_dim=get("qk_rope_head_dim"),
              v_head_dim=get("v_head_dim"), num_experts=experts, moe_top_k=top_k,
              moe_ffn_hidden_size=get("moe_intermediate_size"), moe_layer_freq=1,
              first_k_dense=min(get("first_k_dense_replace"), kw["num_layers"]),
              moe_shared_experts=get("n_shared_experts") or 0, moe_router="sigmoid",
              moe_n_group=get("n_group") or 1, moe_topk_group=get("topk_group") or 1,
              moe_routed_scaling_factor=float(get("routed_scaling_factor")),
              moe_norm_topk_prob=bool(get("norm_topk_prob")), moe_capacity_factor=0.0)
    # Training hyperparameters, not the function: DeepSeek's config.json has no keys for ours.
    for key in ("moe_aux_loss_coeff", "moe_z_loss_coeff", "moe_seq_aux_loss_coeff", "moe_bias_update_rate",
                "mtp_loss_weight"):
        if key in ours:
            kw[key] = float(ours[key])
    return kw


# -- [model] -> config.json ---------------------------------------------------------------------------------------
def write_recent(cfg, fmt, common, llama):
    """config.json of the recent format ``fmt``; ``common`` and ``llama``: hf.py's shared and Llama-family keys."""
    name, model_type = RECENT[fmt]
    out = {"architectures": [name], "model_type": model_type, **common, **llama, **write_window(cfg, fmt)}
    out.pop("attention_bias", None), out.pop("mlp_bias", None), out.pop("pretraining_tp", None)
    if fmt in ("qwen3", "qwen3_moe"):
        out["attention_bias"] = False
    if fmt == "qwen3_moe":
        out.update(num_experts=cfg.num_experts, num_experts_per_tok=cfg.moe_top_k,
                   moe_intermediate_size=cfg.moe_ffn_hidden_size, norm_topk_prob=bool(cfg.moe_norm_topk_prob),
                   decoder_sparse_step=1, mlp_only_layers=[i for i in range(cfg.num_layers) if not cfg.is_moe_layer(i)],
                   router_aux_loss_coef=cfg.moe_aux_loss_coeff, output_router_logits=False,
                   megagopher={"moe_z_loss_coeff": cfg.moe_z_loss_coeff,
                               "moe_seq_aux_loss_coeff": cfg.moe_seq_aux_loss_coeff})
    elif fmt == "deepseek_v3":
        out.update(_deepseek_config(cfg))
    return out


def _deepseek_config(cfg):
    return {"head_dim": cfg.qk_rope_head_dim, "num_key_value_heads": cfg.num_attention_heads,
            "q_lora_rank": cfg.q_lora_rank or None, "kv_lora_rank": cfg.kv_lora_rank,
            "qk_nope_head_dim": cfg.qk_nope_head_dim, "qk_rope_head_dim": cfg.qk_rope_head_dim,
            "v_head_dim": cfg.v_head_dim, "n_routed_experts": cfg.num_experts, "num_experts_per_tok": cfg.moe_top_k,
            "moe_intermediate_size": cfg.moe_ffn_hidden_size, "first_k_dense_replace": cfg.first_k_dense,
            "n_shared_experts": cfg.moe_shared_experts, "n_group": cfg.moe_n_group, "topk_group": cfg.moe_topk_group,
            "routed_scaling_factor": cfg.moe_routed_scaling_factor, "norm_topk_prob": bool(cfg.moe_norm_topk_prob),
            "rope_interleave": True, "attention_bias": False, "num_nextn_predict_layers": cfg.mtp_num_layers,
            "megagopher": {key: getattr(cfg, key) for key in ("moe_aux_loss_coeff", "moe_z_loss_coeff",
                                                             "moe_seq_aux_loss_coeff", "moe_bias_update_rate",
                                                             "mtp_loss_weight")}}


# -- which format expresses a model ------------------------------------------------------------------------------
def recent_problems(cfg, fmt):
    """What ``fmt`` (any format) cannot express of the features of issue 26 (an empty list when it can)."""
    llama_family = fmt in ("llama", "mixtral") or fmt in RECENT
    checks = [
        (not cfg.is_mla or fmt == "deepseek_v3", f"has no multi-head latent attention (model.kv_lora_rank = "
                                                 f"{cfg.kv_lora_rank}; format 'deepseek_v3' has)"),
        (cfg.is_mla or fmt != "deepseek_v3", "needs multi-head latent attention (model.kv_lora_rank > 0)"),
        (not cfg.mtp_num_layers or fmt == "deepseek_v3", f"has no multi-token prediction (model.mtp_num_layers = "
                                                         f"{cfg.mtp_num_layers}; format 'deepseek_v3' has)"),
        (not cfg.rope_scaling or llama_family, f"has no rope scaling (model.rope_scaling type "
                                               f"{cfg.rope_scaling.get('type')!r})"),
        (not cfg.rope_scaling.get("mscale_all_dim") or fmt == "deepseek_v3",
         f"does not scale its softmax by YaRN's mscale_all_dim = {cfg.rope_scaling.get('mscale_all_dim')} "
         "(DeepSeek's attention does: format 'deepseek_v3')"),
        (not cfg.kv_channels or llama_family, f"has no head width apart from hidden_size / num_attention_heads "
                                              f"(model.kv_channels = {cfg.kv_channels})"),
        (cfg.qk_norm == (fmt in ("qwen3", "qwen3_moe")), f"{'needs' if fmt in ('qwen3', 'qwen3_moe') else 'has no'} "
                                                          f"query/key norms (model.qk_norm = {cfg.qk_norm})"),
        (not cfg.qkv_bias or fmt == "qwen2", "has no biases on q, k, v alone (model.qkv_bias = true; format 'qwen2' "
                                             "has)"),
        (not cfg.window_size or fmt in ("qwen2", "qwen3", "mistral", "qwen3_moe"),
         f"has no sliding window (model.window_size = {cfg.window_size})"),
        (not cfg.window_pattern or fmt in ("qwen2", "qwen3"),
         f"slides in every layer or none, not model.window_pattern = {cfg.window_pattern}")]
    checks += _routing_checks(cfg, fmt)
    return [text for ok, text in checks if not ok]


def _routing_checks(cfg, fmt):
    deepseek, moe = fmt == "deepseek_v3", fmt in ("mixtral", "qwen3_moe", "deepseek_v3")
    return [
        (not cfg.num_experts or moe, f"has no experts (model.num_experts = {cfg.num_experts}; formats 'mixtral', "
                                     "'qwen3_moe' and 'deepseek_v3' have)"),
        (cfg.num_experts or not moe, "needs experts (model.num_experts > 0)"),
        (not moe or cfg.moe_router == ("sigmoid" if deepseek else "softmax"),
         f"routes by {'sigmoid' if deepseek else 'softmax'}, not model.moe_router = {cfg.moe_router!r}"),
        (not moe or not cfg.moe_capacity_factor, f"is dropless, not model.moe_capacity_factor = "
                                                 f"{cfg.moe_capacity_factor}"),
        (not moe or deepseek or not cfg.moe_shared_experts, f"has no shared experts (model.moe_shared_experts = "
                                                            f"{cfg.moe_shared_experts})"),
        (cfg.moe_n_group == 1 or deepseek, f"has no group-limited routing (model.moe_n_group = {cfg.moe_n_group})"),
        (cfg.moe_routed_scaling_factor == 1.0 or deepseek, f"has no routed scaling (model.moe_routed_scaling_factor "
                                                           f"= {cfg.moe_routed_scaling_factor})"),
        (cfg.moe_norm_topk_prob or fmt in ("qwen3_moe", "deepseek_v3"), "renormalises the top-k weights, not "
                                                                        "model.moe_norm_topk_prob = false"),
        (not cfg.num_experts or fmt == "qwen3_moe" or (cfg.moe_layer_freq == 1 and (deepseek or not cfg.first_k_dense)),
         f"places experts otherwise (model.moe_layer_freq = {cfg.moe_layer_freq}, model.first_k_dense = "
         f"{cfg.first_k_dense})"),
        (not cfg.moe_bias_update_rate or deepseek, f"has no selection bias (model.moe_bias_update_rate = "
                                                   f"{cfg.moe_bias_update_rate})")]
