"""Activation bytes of the DeepSeek-V3 pieces for memory.py: multi-head latent attention and multi-token
prediction (issue 26), counted tensor by tensor from what model/mla.py and model/mtp.py save for the backward
pass with the fused kernels, as memory.py counts the rest (tests/test_memory_arch.py holds them to
``saved_activation_bytes`` to the byte).

MLA (DeepSeek-V2, Liu et al. 2024; model/mla.py) keeps, per micro-batch of n tokens (n_sp of them on a rank
between the TP regions under sequence parallelism):
- the down projections' input, the attention norm's output: on this rank's tokens (replicated linears), and
  gathered to all n once more by a full query projection (column-parallel) when there is no q_lora_rank;
- with q_lora_rank, the query latent (its norm's input, with fp32 statistics) and the normed latent the up
  projection reads (gathered under SP);
- the key-value down projection's output (the latent norm reads a view of it) and fp32 statistics, the normed
  latent kv_b_proj reads (gathered), kv_b_proj's output (the values are views of it);
- the query and key copies the kernel reads ([nope, rotated rope] per head), flash attention's output and
  log-sum-exp (or, unfused, the softmax output and the output projection's input), as for any attention.

MTP (DeepSeek-V3 section 2.2; model/mtp.py), on the last stage, per module k: the copied embedding slice the
embedding norm reads, the hidden state the other norm reads, both norms' statistics, the concatenation eh_proj
reads (2h per token), the module's transformer layer (never recomputed: the modules sit outside the model's
recompute) and its final norm; once: the looked-up token ids, and the output head's input and the cross
entropy's logits for the D extra passes (one head GEMM over D + 1 batches), and the D loss scales.
"""


def mla_activations(cfg, s, b, tp, sp, recompute, e, mask_bytes):
    """Bytes one MLA block saves for its backward (the attention norm's output included), itemised."""
    a, h, heads = cfg.num_attention_heads, cfg.hidden_size, cfg.num_attention_heads // tp
    qk, v, rank, rot = cfg.head_dim, cfg.v_head_dim, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    n = s * b
    n_sp = n // tp if sp and tp > 1 else n
    inputs = n_sp * h * e  # the replicated down projections read this rank's tokens
    if not cfg.q_lora_rank and n_sp != n:
        inputs += n * h * e  # the column-parallel q_proj keeps its own gathered copy
    out = {"MLA projection inputs": inputs}
    if cfg.q_lora_rank:
        r = cfg.q_lora_rank
        out["MLA query latent (norm input, statistics, gathered normed latent)"] = n_sp * (r * e + 4) + n * r * e
    out["MLA key-value latent (down projection output, statistics, gathered normed latent)"] = \
        n_sp * ((rank + rot) * e + 4) + n * rank * e
    out["MLA kv_b_proj output (keys' nope part, values)"] = n * a * (cfg.qk_nope_head_dim + v) // tp * e
    out["MLA q, k (nope and rotated rope copies)"] = 2 * n * a * qk // tp * e
    if recompute == "selective":  # the core is recomputed: the output projection keeps its own input
        out["output projection input"] = n * a * v // tp * e
    elif cfg.core_attention == "flash":
        out["flash attention (output, log-sum-exp)"] = n * a * v // tp * e + b * heads * s * 4
    else:
        out["softmax output"] = b * heads * s * s * e
        if cfg.attention_dropout > 0:
            out["attention dropout (mask, output)"] = b * heads * s * s * (mask_bytes + e)
        out["output projection input"] = n * a * v // tp * e
    return out


def mtp_activations(cfg, s, b, tp, sp, e, vocab_rows):
    """Bytes the MTP modules save beyond their transformer layers (memory.py adds those), itemised."""
    h, d = cfg.hidden_size, cfg.mtp_num_layers
    n = s * b
    n_sp = n // tp if sp and tp > 1 else n
    stats = 1 if cfg.normalization == "rmsnorm" else 2
    norm = n_sp * h * e + stats * n_sp * 4
    ids = 8 * n * d + (n * d if tp > 1 else 0)  # int64 ids (over TP: the local ids and the outside mask)
    return {"MTP norms (embedding, hidden, final: inputs, statistics)": 3 * d * norm,
            "MTP eh_proj inputs": d * n_sp * 2 * h * e,
            "MTP token ids, loss scales": ids + 4 * d,
            "MTP output head inputs and cross entropy (D more passes)": d * n * (h + vocab_rows) * e}
