"""The GPT model's configuration: the ``[model]`` keys of ARCHITECTURE 4.2 and a few more."""
from dataclasses import asdict, dataclass, fields


@dataclass
class GPTConfig:
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int = 0          # GQA; 0 means = num_attention_heads (plain multi-head attention)
    ffn_hidden_size: int = 0           # 0 means 4 * hidden_size
    vocab_size: int = 256              # used when the data has no tokenizer
    seq_length: int = 64
    normalization: str = "layernorm"   # "layernorm" | "rmsnorm"
    activation: str = "gelu"           # "gelu" (tanh approximation, GPT-2's gelu_new) | "swiglu"
    position_embedding: str = "learned"  # "learned" | "rope"
    rotary_percent: float = 1.0        # fraction of each head's channels rotated (CodeGen: rotary_dim / head_dim)
    rope_theta: float = 10000.0
    max_position_embeddings: int = 0   # learned positions; 0 means seq_length
    tie_embeddings: bool = True
    dropout: float = 0.0               # hidden dropout: after the embedding and each residual branch
    attention_dropout: float = 0.0     # on attention probabilities (unfused core attention only)
    parallel_residual: bool = False    # GPT-J / CodeGen: x + attn(ln(x)) + mlp(ln(x))
    bias: bool = True                  # biases in the linear layers
    norm_epsilon: float = 1e-5
    init_std: float = 0.02
    core_attention: str = "flash"      # "flash" (fused attention kernel) | "unfused" (matmuls + scaled-masked softmax)
    make_vocab_size_divisible_by: int = 128
    label_smoothing: float = 0.0

    def __post_init__(self):
        if not self.num_query_groups:
            self.num_query_groups = self.num_attention_heads
        if not self.ffn_hidden_size:
            self.ffn_hidden_size = 4 * self.hidden_size
        if not self.max_position_embeddings:
            self.max_position_embeddings = self.seq_length
        self.validate()

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self):
        """Rotated channels per head: even, and at most head_dim."""
        return int(self.head_dim * self.rotary_percent) // 2 * 2

    def validate(self):
        choices = {"normalization": ("layernorm", "rmsnorm"), "activation": ("gelu", "swiglu"),
                   "position_embedding": ("learned", "rope"), "core_attention": ("flash", "unfused")}
        for key, valid in choices.items():
            if getattr(self, key) not in valid:
                raise ValueError(f"model.{key} = {getattr(self, key)!r}; valid: {', '.join(map(repr, valid))}")
        for key in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "seq_length"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"model.{key} = {getattr(self, key)!r} must be a positive integer")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"model.hidden_size = {self.hidden_size} is not divisible by "
                             f"model.num_attention_heads = {self.num_attention_heads}")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(f"model.num_attention_heads = {self.num_attention_heads} is not divisible by "
                             f"model.num_query_groups = {self.num_query_groups}")
        if self.position_embedding == "rope" and not 0 < self.rotary_percent <= 1:
            raise ValueError(f"model.rotary_percent = {self.rotary_percent} must be in (0, 1]")
        if self.position_embedding == "rope" and self.rotary_dim < 2:
            raise ValueError(f"model.rotary_percent = {self.rotary_percent} rotates fewer than 2 channels of "
                             f"head_dim {self.head_dim}")
        if self.attention_dropout > 0 and self.core_attention == "flash":
            raise ValueError(f"model.attention_dropout = {self.attention_dropout} needs model.core_attention = "
                             "'unfused' (the fused attention kernel has no dropout)")
        for key in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ValueError(f"model.{key} = {getattr(self, key)} must be in [0, 1)")

    @classmethod
    def keys(cls):
        return [f.name for f in fields(cls)]

    def to_dict(self):
        return asdict(self)
