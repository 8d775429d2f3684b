"""The ``[model]`` section: the GPT model's configuration (docs/ARCHITECTURE.md 4.2 and a few more keys).

It is both a config section and the model's own constructor argument, so it validates itself on
construction (a researcher building ``GPTModel(GPTConfig(...))`` gets the same errors as a run).
Zero means "derived" for num_query_groups, ffn_hidden_size and max_position_embeddings.
"""
from dataclasses import asdict, dataclass, fields

from megagopher.config.fields import ConfigError, check_section, option

_POSITIVE = (lambda v: v >= 1, "must be a positive integer")
_NON_NEGATIVE = (lambda v: v >= 0, "must be >= 0")
_PROBABILITY = (lambda v: 0.0 <= v < 1.0, "must be in [0, 1)")


@dataclass
class GPTConfig:
    num_layers: int = option(2, "transformer layers", check=_POSITIVE)
    hidden_size: int = option(64, "model width (d_model)", check=_POSITIVE)
    num_attention_heads: int = option(4, "query heads", check=_POSITIVE)
    num_query_groups: int = option(0, "key/value heads for grouped-query attention; 0 = num_attention_heads",
                                   check=_NON_NEGATIVE)
    ffn_hidden_size: int = option(0, "MLP width; 0 = 4 * hidden_size", check=_NON_NEGATIVE)
    vocab_size: int = option(256, "vocabulary, used when the data has no tokenizer", check=_POSITIVE)
    seq_length: int = option(64, "tokens per sample (a stage may override it)", check=_POSITIVE)
    normalization: str = option("layernorm", "normalisation layer", choices=("layernorm", "rmsnorm"))
    activation: str = option("gelu", "MLP activation (gelu: tanh approximation, GPT-2's gelu_new; gelu_exact: "
                                     "the erf GeLU, NeoX's and BERT's \"gelu\")",
                             choices=("gelu", "gelu_exact", "swiglu"))
    position_embedding: str = option("learned", "positions: learned table or rotary", choices=("learned", "rope"))
    rotary_percent: float = option(1.0, "fraction of each head's channels rotated (CodeGen: rotary_dim / head_dim)")
    rope_theta: float = option(10000.0, "rotary base")
    max_position_embeddings: int = option(0, "longest sequence (learned table size); 0 = the longest stage's "
                                             "seq_length", check=_NON_NEGATIVE)
    tie_embeddings: bool = option(True, "share the input embedding with the output head")
    output_bias: bool = option(False, "a bias on the output head's logits (CodeGen's lm_head), sharded over the "
                                      "vocabulary like the head")
    dropout: float = option(0.0, "hidden dropout: after the embedding and each residual branch", check=_PROBABILITY)
    attention_dropout: float = option(0.0, "dropout on attention probabilities (unfused core attention only)",
                                      check=_PROBABILITY)
    parallel_residual: bool = option(False, "GPT-J / CodeGen block: x + attn(ln(x)) + mlp(ln(x))")
    bias: bool = option(True, "biases in the linear layers")
    norm_epsilon: float = option(1e-5, "epsilon of the normalisation layers")
    init_std: float = option(0.02, "standard deviation of the normal initialisation")
    core_attention: str = option("flash", "attention core: fused kernel or matmuls + scaled-masked softmax",
                                 choices=("flash", "unfused"))
    make_vocab_size_divisible_by: int = option(128, "pad the vocabulary to a multiple of this times tp",
                                               check=_POSITIVE)
    label_smoothing: float = option(0.0, "label smoothing of the cross entropy", check=_PROBABILITY)
    # Mixture of experts (docs/moe.md).
    num_experts: int = option(0, "routed experts per MoE layer; 0 = a dense model", check=_NON_NEGATIVE)
    moe_top_k: int = option(2, "experts each token is routed to", check=_POSITIVE)
    moe_ffn_hidden_size: int = option(0, "each expert's MLP width; 0 = ffn_hidden_size", check=_NON_NEGATIVE)
    moe_layer_freq: int = option(1, "layer i (0-based, global) is a MoE layer when i % moe_layer_freq == 0; "
                                    "1 = every layer", check=_POSITIVE)
    moe_shared_experts: int = option(0, "always-on shared experts: a dense MLP of moe_shared_experts * "
                                        "moe_ffn_hidden_size added to the routed output", check=_NON_NEGATIVE)
    moe_router: str = option("softmax", "router scores: softmax over the experts, or sigmoid; the top-k weights "
                                        "are normalised to sum to one", choices=("softmax", "sigmoid"))
    moe_aux_loss_coeff: float = option(0.0, "load-balancing loss coeff * E * sum_e f_e P_e (Switch/GShard)",
                                       check=_NON_NEGATIVE)
    moe_z_loss_coeff: float = option(0.0, "router z-loss coeff * mean logsumexp(router logits)^2 (ST-MoE)",
                                     check=_NON_NEGATIVE)
    moe_capacity_factor: float = option(0.0, "0 = dropless; > 0: an expert takes at most ceil(cf * T * k / E) "
                                             "of a rank's T tokens, dropping the lowest routing weights",
                                        check=_NON_NEGATIVE)

    # The architectures of 2024-2026 (issue 26): Llama 3, Qwen2/3, Mistral, DeepSeek-V2/V3.
    kv_channels: int = option(0, "each attention head's width; 0 = hidden_size / num_attention_heads (Qwen3 sets "
                                 "it apart, Megatron's kv_channels)", check=_NON_NEGATIVE)
    rope_scaling: dict = option({}, "RoPE scaling table: type = 'llama3' | 'linear' | 'yarn' and its factors "
                                    "(transformers' names; empty = none)")
    qk_norm: bool = option(False, "RMSNorm over each head's query and key before RoPE (Qwen3, OLMo 2)")
    qkv_bias: bool = option(False, "biases on the q, k, v projections only, whatever model.bias says (Qwen2)")
    window_size: int = option(0, "sliding-window attention: query i sees keys i - window_size + 1 .. i "
                                 "(transformers' sliding_window; flash-attn's window_size (w - 1, 0)); "
                                 "0 = full attention", check=_NON_NEGATIVE)
    window_pattern: list = option([], "per-layer 'local' (windowed) / 'global' (full) pattern, repeated over the "
                                      "layers; empty = every layer local when window_size > 0")
    # Multi-head latent attention (DeepSeek-V2, Liu et al. 2024): on when kv_lora_rank > 0.
    q_lora_rank: int = option(0, "MLA: rank of the query compression; 0 = a full query projection",
                              check=_NON_NEGATIVE)
    kv_lora_rank: int = option(0, "MLA: rank of the key-value compression (the cached latent); 0 = no MLA",
                               check=_NON_NEGATIVE)
    qk_nope_head_dim: int = option(0, "MLA: query/key channels per head without RoPE", check=_NON_NEGATIVE)
    qk_rope_head_dim: int = option(0, "MLA: query/key channels per head with RoPE (the key part shared by "
                                      "the heads)", check=_NON_NEGATIVE)
    v_head_dim: int = option(0, "MLA: value channels per head", check=_NON_NEGATIVE)
    # Multi-token prediction (DeepSeek-V3).
    mtp_num_layers: int = option(0, "multi-token prediction modules: module k predicts token t + k + 1",
                                 check=_NON_NEGATIVE)
    mtp_loss_weight: float = option(0.1, "weight of the mean MTP loss added to the LM loss", check=_NON_NEGATIVE)
    # DeepSeek-V3 routing.
    moe_bias_update_rate: float = option(0.0, "auxiliary-loss-free balancing: each step every expert's selection "
                                              "bias moves by this rate times sign(mean load - its load); 0 = off",
                                         check=_NON_NEGATIVE)
    moe_n_group: int = option(1, "group-limited routing: experts in this many groups", check=_POSITIVE)
    moe_topk_group: int = option(1, "group-limited routing: tokens pick experts from this many groups (by the "
                                    "sum of each group's top-2 scores); with moe_n_group = 1 no limit",
                                 check=_POSITIVE)
    moe_routed_scaling_factor: float = option(1.0, "the routed experts' output times this factor")
    moe_norm_topk_prob: bool = option(True, "normalise the top-k routing weights to sum to one (Qwen3-MoE may not)")
    moe_seq_aux_loss_coeff: float = option(0.0, "sequence-wise balance loss coeff * E * sum_e f_e P_e per sequence "
                                                "(DeepSeek-V3), averaged over the sequences", check=_NON_NEGATIVE)
    first_k_dense: int = option(0, "the first k layers keep the dense MLP (DeepSeek's first_k_dense_replace)",
                                check=_NON_NEGATIVE)

    def __post_init__(self):
        self.validate()
        if not self.num_query_groups:
            self.num_query_groups = self.num_attention_heads
        if not self.ffn_hidden_size:
            self.ffn_hidden_size = 4 * self.hidden_size
        if not self.max_position_embeddings:
            self.max_position_embeddings = self.seq_length
        if not self.moe_ffn_hidden_size:
            self.moe_ffn_hidden_size = self.ffn_hidden_size
        self._validate_shapes()

    @property
    def head_dim(self):
        """Channels per attention head (of the query and key under MLA: nope + rope)."""
        if self.is_mla:
            return self.qk_nope_head_dim + self.qk_rope_head_dim
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def is_mla(self):
        return self.kv_lora_rank > 0

    @property
    def rotary_dim(self):
        """Rotated channels per head: even, and at most head_dim (MLA: qk_rope_head_dim)."""
        if self.is_mla:
            return self.qk_rope_head_dim
        return int(self.head_dim * self.rotary_percent) // 2 * 2

    def is_local_layer(self, index):
        """Whether layer ``index`` (global, 0-based) attends within the sliding window."""
        if not self.window_size:
            return False
        return not self.window_pattern or self.window_pattern[index % len(self.window_pattern)] == "local"

    def validate(self):
        """Every field against its declaration (type, choices, range); raises ConfigError (a ValueError)."""
        check_section("model", self)

    def _validate_shapes(self):
        self._validate_moe()
        self._validate_attention_variants()
        if not self.kv_channels and not self.is_mla and self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"model.hidden_size = {self.hidden_size} is not divisible by "
                              f"model.num_attention_heads = {self.num_attention_heads}")
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(f"model.num_attention_heads = {self.num_attention_heads} is not divisible by "
                              f"model.num_query_groups = {self.num_query_groups}")
        if self.position_embedding == "rope" and not 0 < self.rotary_percent <= 1:
            raise ConfigError(f"model.rotary_percent = {self.rotary_percent} must be in (0, 1]")
        if self.position_embedding == "rope" and self.rotary_dim < 2:
            raise ConfigError(f"model.rotary_percent = {self.rotary_percent} rotates fewer than 2 channels of "
                              f"head_dim {self.head_dim}")
        if self.attention_dropout > 0 and self.core_attention == "flash":
            raise ConfigError(f"model.attention_dropout = {self.attention_dropout} needs model.core_attention = "
                              "'unfused' (the fused attention kernel has no dropout)")

    def is_moe_layer(self, index):
        """Whether layer ``index`` (global, 0-based) has experts instead of the dense MLP."""
        return self.num_experts > 0 and index >= self.first_k_dense and index % self.moe_layer_freq == 0

    def _validate_attention_variants(self):
        bad = [p for p in self.window_pattern if p not in ("local", "global")]
        if bad:
            raise ConfigError(f"model.window_pattern = {self.window_pattern!r}: entries must be 'local' or 'global'")
        if self.window_pattern and not self.window_size:
            raise ConfigError("model.window_pattern needs model.window_size > 0")
        validate_rope_scaling(self.rope_scaling)
        if self.rope_scaling and self.position_embedding != "rope":
            raise ConfigError("model.rope_scaling needs model.position_embedding = 'rope'")
        if self.is_mla:
            need = {k: getattr(self, k) for k in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")}
            zero = [k for k, v in need.items() if not v]
            if zero:
                raise ConfigError(f"model.kv_lora_rank = {self.kv_lora_rank} (MLA) needs {', '.join(zero)} > 0")
            if self.qk_rope_head_dim % 2:
                raise ConfigError(f"model.qk_rope_head_dim = {self.qk_rope_head_dim} must be even (RoPE rotates pairs)")
            if self.position_embedding != "rope" or self.num_query_groups not in (0, self.num_attention_heads):
                raise ConfigError("MLA (model.kv_lora_rank > 0) needs position_embedding = 'rope' and one key/value "
                                  "group per head (num_query_groups = 0 or num_attention_heads)")
            if self.qk_norm or self.qkv_bias or self.kv_channels:
                raise ConfigError("MLA (model.kv_lora_rank > 0) has its own norms and head widths: qk_norm, qkv_bias "
                                  "and kv_channels do not apply")
            if self.parallel_residual or self.window_size:
                raise ConfigError("MLA (model.kv_lora_rank > 0) runs sequential blocks with full causal attention: "
                                  "parallel_residual and window_size do not apply (model/mla.py)")
        elif self.q_lora_rank:
            raise ConfigError(f"model.q_lora_rank = {self.q_lora_rank} needs MLA (model.kv_lora_rank > 0)")

    def _validate_moe(self):
        if self.num_experts and self.moe_top_k > self.num_experts:
            raise ConfigError(f"model.moe_top_k = {self.moe_top_k} exceeds model.num_experts = {self.num_experts}")
        if self.num_experts and self.num_experts % self.moe_n_group:
            raise ConfigError(f"model.num_experts = {self.num_experts} is not divisible by model.moe_n_group = "
                              f"{self.moe_n_group}")
        if self.moe_topk_group > self.moe_n_group:
            raise ConfigError(f"model.moe_topk_group = {self.moe_topk_group} exceeds model.moe_n_group = "
                              f"{self.moe_n_group}")
        if self.moe_n_group > 1 and self.moe_top_k > self.moe_topk_group * self.num_experts // self.moe_n_group:
            raise ConfigError(f"model.moe_top_k = {self.moe_top_k} exceeds the experts of model.moe_topk_group = "
                              f"{self.moe_topk_group} groups")
        if self.moe_shared_experts and not self.num_experts:
            raise ConfigError(f"model.moe_shared_experts = {self.moe_shared_experts} needs routed experts "
                              "(model.num_experts > 0)")
        if self.moe_n_group > 1 and self.num_experts // self.moe_n_group < 2:
            raise ConfigError(f"model.moe_n_group = {self.moe_n_group} leaves fewer than 2 of model.num_experts = "
                              f"{self.num_experts} in a group (a group scores its two best experts)")
        if self.moe_bias_update_rate > 0 and self.moe_router != "sigmoid":
            raise ConfigError(f"model.moe_bias_update_rate = {self.moe_bias_update_rate} needs model.moe_router = "
                              f"'sigmoid' (the balancing bias is DeepSeek-V3's), not {self.moe_router!r}")

    @classmethod
    def keys(cls):
        return [f.name for f in fields(cls)]

    def to_dict(self):
        return asdict(self)



# RoPE scaling tables (transformers' rope_scaling / rope_parameters names): the keys each type takes and
# their defaults (None: required).
ROPE_SCALING_KEYS = {
    "linear": {"factor": None},
    "llama3": {"factor": None, "low_freq_factor": None, "high_freq_factor": None,
               "original_max_position_embeddings": None},
    "yarn": {"factor": None, "original_max_position_embeddings": None, "beta_fast": 32.0, "beta_slow": 1.0,
             "mscale": 1.0, "mscale_all_dim": 0.0},
}


def validate_rope_scaling(table):
    """ConfigError unless ``table`` is empty or a valid rope_scaling table (type and its keys, numbers)."""
    if not table:
        return
    kind = table.get("type")
    if kind not in ROPE_SCALING_KEYS:
        raise ConfigError(f"model.rope_scaling.type = {kind!r}; valid: {', '.join(map(repr, ROPE_SCALING_KEYS))}")
    keys = ROPE_SCALING_KEYS[kind]
    for key, value in table.items():
        if key == "type":
            continue
        if key not in keys:
            raise ConfigError(f"unknown key model.rope_scaling.{key} for type {kind!r}; valid: {', '.join(keys)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"model.rope_scaling.{key} = {value!r} must be a number")
    missing = [k for k, default in keys.items() if default is None and k not in table]
    if missing:
        raise ConfigError(f"model.rope_scaling (type {kind!r}) needs {', '.join(missing)}")
    if table["factor"] <= 0:
        raise ConfigError(f"model.rope_scaling.factor = {table['factor']} must be > 0")


def rope_scaling_params(table):
    """The full parameters of a rope_scaling table, defaults filled in (validate_rope_scaling first)."""
    return {**ROPE_SCALING_KEYS[table["type"]], **table}
