"""What a GPTConfig's shape costs: parameters per rank, multiply-accumulates per token, generation-cache bytes.

memory.py (the memory report) and training/metrics.py (model FLOPs, MFU) both count from here, so a new
architectural piece is added once. Every count follows what megagopher's modules build (model/gpt.py,
attention.py, mla.py, moe.py, mtp.py) and is checked against the built model by tests/test_memory.py and
tests/test_memory_arch.py:

- attention: a fused QKV projection of (heads + 2 groups) * head_dim columns (head_dim = kv_channels when set:
  Qwen3's 128 at hidden 4096 / 32 heads), biases on it from model.bias or model.qkv_bias (Qwen2), and with
  model.qk_norm one RMSNorm weight of head_dim for the queries and one for the keys (Qwen3), replicated over TP;
- multi-head latent attention (DeepSeek-V2, Liu et al. 2024; V3): the query either from one projection or
  through the q_lora_rank bottleneck (down projection and its RMSNorm replicated over TP, up projection split by
  heads), the key-value down projection to kv_lora_rank + qk_rope_head_dim (replicated) and its RMSNorm, the up
  projection to heads * (qk_nope_head_dim + v_head_dim) (split by heads), the output projection from
  heads * v_head_dim (row-parallel);
- MoE layers (model/moe.py): the router, the experts (num_experts / ep on an expert-parallel rank), the shared
  experts; the auxiliary-loss-free balancing bias is a buffer, not a parameter; dense until first_k_dense;
- multi-token prediction (DeepSeek-V3, model/mtp.py): on the last pipeline stage, per module the norms of the
  hidden state and of the embedding, the projection of their concatenation (2h -> h, no bias, replicated
  over TP), one transformer layer (global index num_layers + k) and its final norm, sharing the output head;
  a last stage without the embedding (pp > 1, untied) holds its own copy of the embedding for the modules.

FLOPs follow Narayanan et al. 2021 (appendix): 2 FLOPs per multiply-accumulate of every matmul, the attention
scores and context products counted in full (every query against every key it may see, no causal halving): s
keys for a global layer, min(window_size, s) for a local one (Beltagy et al. 2020 / Mistral's sliding window:
the same full-square convention, restricted to the window). Under MLA the scores take qk_nope + qk_rope
channels and the context v_head_dim. MoE layers count the active experts (top_k of them) plus the shared ones
and the router; each MTP module adds its projection, its layer and one more pass of the output head.
"""
import math


def padded_vocab(cfg, tp):
    multiple = cfg.make_vocab_size_divisible_by * tp
    return int(math.ceil(cfg.vocab_size / multiple) * multiple)


def norm_params(cfg, width=None):
    """One normalisation layer of ``width`` channels (hidden_size by default): weight, and LayerNorm's bias."""
    return (width or cfg.hidden_size) * (2 if cfg.normalization == "layernorm" else 1)


# -- parameters ------------------------------------------------------------------------------------------

def attention_params(cfg, tp=1):
    """One layer's attention block on one TP rank (its input norm excluded)."""
    if cfg.is_mla:
        return mla_params(cfg, tp)
    h, d, a, g = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_query_groups
    qkv = (a + 2 * g) * d // tp
    n = qkv * h + (qkv if cfg.bias or cfg.qkv_bias else 0)          # fused QKV, column-parallel
    n += h * a * d // tp + (h if cfg.bias else 0)                   # output projection, row-parallel
    if cfg.qk_norm:
        n += 2 * d                                                  # q and k RMSNorm weights, replicated
    return n


def mla_params(cfg, tp=1):
    """Multi-head latent attention on one TP rank: the low-rank projections are replicated (every rank needs
    the whole latent), the per-head up projections and the output projection split by heads."""
    h, a = cfg.hidden_size, cfg.num_attention_heads
    qk, rope, v = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    bias = cfg.bias
    if cfg.q_lora_rank:
        r = cfg.q_lora_rank
        n = h * r + (r if bias else 0) + r + r * a * qk // tp          # the latent norms are RMSNorms
    else:
        n = h * a * qk // tp
    latent = cfg.kv_lora_rank + rope
    n += h * latent + (latent if bias else 0) + cfg.kv_lora_rank
    n += cfg.kv_lora_rank * a * (cfg.qk_nope_head_dim + v) // tp
    return n + a * v // tp * h + (h if bias else 0)


def mlp_params(cfg, f, tp):
    h, up = cfg.hidden_size, 2 if cfg.activation == "swiglu" else 1
    n = up * (f // tp * h + (f // tp if cfg.bias else 0))           # fc1 (gate and up under SwiGLU)
    return n + h * f // tp + (h if cfg.bias else 0)                 # fc2


def expert_params(cfg, tp=1, ep=1):
    """The routed experts of one MoE layer on one TP and expert-parallel rank."""
    return cfg.num_experts // ep * mlp_params(cfg, cfg.moe_ffn_hidden_size, tp)


def moe_params(cfg, tp=1, ep=1):
    """A MoE layer's router (E x h, replicated), its experts (each an MLP of moe_ffn_hidden_size, TP-split
    like the MLP; fc2's bias per expert; E / ep of them on an expert-parallel rank) and its shared
    experts' MLP, on one TP rank."""
    e, h, f = cfg.num_experts, cfg.hidden_size, cfg.moe_ffn_hidden_size
    n = e * h + expert_params(cfg, tp, ep)
    if cfg.moe_shared_experts:
        n += mlp_params(cfg, cfg.moe_shared_experts * f, tp)
    return n


def layer_params(cfg, tp=1, moe=False, ep=1):
    """Parameters of one transformer layer on one TP rank (``moe``: with experts in place of the MLP)."""
    n = norm_params(cfg) * (1 if cfg.parallel_residual else 2) + attention_params(cfg, tp)
    if moe:
        return n + moe_params(cfg, tp, ep)
    return n + mlp_params(cfg, cfg.ffn_hidden_size, tp)


def mtp_params(cfg, tp=1, ep=1):
    """The multi-token prediction modules on the last pipeline stage (without the embedding copy)."""
    h, n = cfg.hidden_size, 0
    for k in range(cfg.mtp_num_layers):
        n += 3 * norm_params(cfg) + 2 * h * h                      # enorm, hnorm, final norm; eh_proj replicated
        n += layer_params(cfg, tp, cfg.is_moe_layer(cfg.num_layers + k), ep)
    return n


def stage_params(cfg, tp, num_layers, pre_process, post_process, pp=1, first_layer=0, ep=1):
    """Parameters of one model chunk of layers first_layer .. first_layer + num_layers - 1, as GPTModel builds
    them."""
    h = cfg.hidden_size
    n = sum(layer_params(cfg, tp, cfg.is_moe_layer(i), ep) for i in range(first_layer, first_layer + num_layers))
    vocab_rows = padded_vocab(cfg, tp) // tp
    if pre_process:
        n += vocab_rows * h + (cfg.max_position_embeddings * h if cfg.position_embedding == "learned" else 0)
    if post_process:
        n += norm_params(cfg)
        if not cfg.tie_embeddings or not pre_process:
            n += vocab_rows * h
        n += vocab_rows if cfg.output_bias else 0
        if cfg.mtp_num_layers:
            n += mtp_params(cfg, tp, ep)
            if not pre_process and not cfg.tie_embeddings:  # the modules' embedding (tied: the head is it)
                n += vocab_rows * h
    return n


def moe_layer_count(cfg, first_layer, num_layers, post_process):
    """MoE layers of a chunk, its MTP modules' included (they sit with the last stage)."""
    n = sum(cfg.is_moe_layer(i) for i in range(first_layer, first_layer + num_layers))
    if post_process:
        n += sum(cfg.is_moe_layer(cfg.num_layers + k) for k in range(cfg.mtp_num_layers))
    return n


# -- multiply-accumulates per token (model FLOPs = 2 x these) --------------------------------------------

def attention_macs(cfg, layer, s):
    """Multiply-accumulates per token of layer ``layer``'s attention at sequence length ``s``: projections,
    then the scores and context products over the keys a query may see, counted in full."""
    h, a = cfg.hidden_size, cfg.num_attention_heads
    keys = min(cfg.window_size, s) if cfg.is_local_layer(layer) else s
    if cfg.is_mla:
        qk, v = cfg.head_dim, cfg.v_head_dim
        r = cfg.q_lora_rank
        proj = (h * r + r * a * qk) if r else h * a * qk
        proj += h * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank * a * (cfg.qk_nope_head_dim + v)
        return proj + a * v * h + keys * a * (qk + v)
    d, g = cfg.head_dim, cfg.num_query_groups
    return h * (a + 2 * g) * d + a * d * h + keys * 2 * a * d


def mlp_macs(cfg, layer):
    """Multiply-accumulates per token of layer ``layer``'s MLP, or of its router, top_k experts and shared
    experts."""
    h, up = cfg.hidden_size, 3 if cfg.activation == "swiglu" else 2
    if not cfg.is_moe_layer(layer):
        return up * h * cfg.ffn_hidden_size
    f = cfg.moe_ffn_hidden_size
    return h * cfg.num_experts + up * h * f * (cfg.moe_top_k + cfg.moe_shared_experts)


def forward_macs_per_token(cfg, s):
    """Multiply-accumulates of one forward pass per token: the layers, the output head, the MTP modules."""
    h = cfg.hidden_size
    n = sum(attention_macs(cfg, i, s) + mlp_macs(cfg, i) for i in range(cfg.num_layers)) + h * cfg.vocab_size
    for k in range(cfg.mtp_num_layers):
        i = cfg.num_layers + k
        n += 2 * h * h + attention_macs(cfg, i, s) + mlp_macs(cfg, i) + h * cfg.vocab_size
    return n


# -- generation cache ------------------------------------------------------------------------------------

def kv_cache_bytes(cfg, batch, seq, dtype_bytes, tp=1):
    """Bytes of the generation cache on one TP rank after ``seq`` positions of ``batch`` rows: per layer the
    keys and values of this rank's groups (a local layer keeps at most window_size positions), or under MLA
    the compressed latent and the shared RoPE key (kv_lora_rank + qk_rope_head_dim per position, the same
    on every TP rank). The MTP modules take no part in generation."""
    total = 0
    for i in range(cfg.num_layers):
        if cfg.is_mla:
            total += seq * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        else:
            kept = min(seq, cfg.window_size) if cfg.is_local_layer(i) else seq
            total += kept * 2 * cfg.num_query_groups // tp * cfg.head_dim
    return total * batch * dtype_bytes
