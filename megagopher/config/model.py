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
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self):
        """Rotated channels per head: even, and at most head_dim."""
        return int(self.head_dim * self.rotary_percent) // 2 * 2

    def validate(self):
        """Every field against its declaration (type, choices, range); raises ConfigError (a ValueError)."""
        check_section("model", self)

    def _validate_shapes(self):
        self._validate_moe()
        if self.hidden_size % self.num_attention_heads:
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
        return self.num_experts > 0 and index % self.moe_layer_freq == 0

    def _validate_moe(self):
        if self.num_experts and self.moe_top_k > self.num_experts:
            raise ConfigError(f"model.moe_top_k = {self.moe_top_k} exceeds model.num_experts = {self.num_experts}")
        if self.moe_shared_experts and not self.num_experts:
            raise ConfigError(f"model.moe_shared_experts = {self.moe_shared_experts} needs routed experts "
                              "(model.num_experts > 0)")

    @classmethod
    def keys(cls):
        return [f.name for f in fields(cls)]

    def to_dict(self):
        return asdict(self)

