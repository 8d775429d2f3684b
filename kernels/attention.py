"""Fused attention, forward and backward: FlashAttention-2 (Dao 2023, "FlashAttention-2: Faster Attention
with Better Parallelism and Work Partitioning").

Forward: one program per (query block, batch x head) streams the key/value blocks through an online
softmax (running max m and sum l, rescaling the accumulator), so the s x s score matrix never exists; it
saves the logsumexp of each row for the backward. Backward: a dK/dV kernel (one program per key block and
kv head, looping over the query heads of its group and the query blocks) and a dQ kernel (one program per
query block and head), both recomputing P = exp(S - lse) blockwise; no atomics.

Grouped-query / multi-query attention reads kv head h // (h / h_kv) for query head h straight from K and V:
nothing is copied per head. Causal masking is top-left aligned (query i sees keys 0..i), as in the reference.
Scores are kept in base 2 (scaled by log2 e) so the exponentials are exp2.
"""
import torch
import triton
import triton.language as tl

from ._common import (DTYPE_NAMES, autotuned, check_device, check_float, check_nonempty, dot_in_fp32,
                      dot_precision, new_empty, next_pow2)
from .dispatch import Unsupported

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
HEAD_DIMS = (16, 32, 64, 128, 256)

# Every configuration here compiles without register spills and within shared memory for head dims 64, 128
# and 256, bf16 and fp16, sm_90a and sm_100a (tools/check_kernels.py checks it): the autotuner may pick any
# of them at any head dim, so one that spills at d=256 (128x64 tiles do, by 272 bytes to 1.6 KB) is out.
_FWD_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
                for bm, bn, w, s in [(64, 32, 8, 2), (64, 32, 8, 3), (32, 32, 8, 2)]]
_DKDV_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
                 for bm, bn, w, s in [(32, 32, 8, 2), (64, 32, 8, 2)]]
_DQ_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
               for bm, bn, w, s in [(32, 64, 8, 2), (32, 32, 4, 2), (16, 32, 4, 2)]]
# Under the interpreter every program is a Python loop: few, mid-sized blocks keep the tests quick while
# sequence lengths 17, 129, 257 still cross block boundaries.
_INTERP_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)
_KEY = ["HEAD_DIM", "CAUSAL", "seq_bucket"]


@triton.jit
def _load_tile(base, rows, stride, offs_d, n, UPCAST: tl.constexpr):
    # The [rows, HEAD_DIM] tile at base + row * stride + d, zeros for rows past n; in fp32 if UPCAST.
    t = tl.load(base + rows[:, None] * stride + offs_d[None, :], mask=rows[:, None] < n, other=0.0)
    if UPCAST:
        t = t.to(tl.float32)
    return t


@triton.jit
def _store_tile(base, rows, stride, offs_d, n, value):
    # value (fp32) into the [rows, HEAD_DIM] tile at base + row * stride + d, rows past n left alone.
    tl.store(base + rows[:, None] * stride + offs_d[None, :], value.to(base.dtype.element_ty), mask=rows[:, None] < n)


@triton.jit
def _query_program(H, GROUP, BLOCK_M: tl.constexpr):
    # A program over (query block, batch x head): its first query, batch x head, batch, head and the kv
    # head that query head shares (GQA/MQA), read in place.
    off_bh = tl.program_id(1)
    off_h = off_bh % H
    return tl.program_id(0) * BLOCK_M, off_bh, (off_bh // H).to(tl.int64), off_h, off_h // GROUP


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, offs_n, offs_d,
               lo, hi, qk_scale, SEQ_K, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
               DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = _load_tile(k_base, cols, stride_ks, offs_d, SEQ_K, DOT_FP32)
        v = _load_tile(v_base, cols, stride_vs, offs_d, SEQ_K, DOT_FP32)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if MASKED:  # only the blocks on the diagonal or past the end pay for the mask
            valid = cols[None, :] < SEQ_K
            if CAUSAL:
                valid = valid & (cols[None, :] <= offs_m[:, None])
            qk = tl.where(valid, qk, float("-inf"))
        # Every row sees key 0 in the first block it processes, so m_new is finite from the start.
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@autotuned(_FWD_CONFIGS, _INTERP_CONFIG, _KEY)
@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, sm_scale,
                stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh,
                H, GROUP, SEQ_Q, SEQ_K, seq_bucket,
                HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m, off_bh, off_b, off_h, off_hk = _query_program(H, GROUP, BLOCK_M)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = _load_tile(Q + off_b * stride_qb + off_h * stride_qh, offs_m, stride_qs, offs_d, SEQ_Q, DOT_FP32)
    k_base = K + off_b * stride_kb + off_hk * stride_kh
    v_base = V + off_b * stride_vb + off_hk * stride_vh
    qk_scale = sm_scale * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # Key blocks wholly inside the sequence (and, if causal, wholly left of this block's first query)
    # need no mask; the rest (the diagonal, the ragged end) do.
    if CAUSAL:
        hi = tl.minimum(SEQ_K, start_m + BLOCK_M)
        full_end = (tl.minimum(start_m + 1, SEQ_K) // BLOCK_N) * BLOCK_N
    else:
        hi = SEQ_K
        full_end = (SEQ_K // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, offs_n, offs_d,
                               0, full_end, qk_scale, SEQ_K, False, CAUSAL, DOT_FP32, PRECISION, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, offs_n, offs_d,
                               full_end, hi, qk_scale, SEQ_K, True, CAUSAL, DOT_FP32, PRECISION, BLOCK_N)
    acc = acc / l_i[:, None]
    _store_tile(O + off_b * stride_ob + off_h * stride_oh, offs_m, stride_os, offs_d, SEQ_Q, acc)
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # natural-log logsumexp of the scaled scores
    tl.store(LSE + off_bh.to(tl.int64) * SEQ_Q + offs_m, lse, mask=offs_m < SEQ_Q)


@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, stride_ob, stride_os, stride_oh, stride_db, stride_ds, stride_dh,
                      H, SEQ_Q, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    # delta_i = sum_d dO_id * O_id = sum_j P_ij dP_ij, the row term of the softmax backward
    start_m, off_bh, off_b, off_h, _ = _query_program(H, 1, BLOCK_M)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    o = _load_tile(O + off_b * stride_ob + off_h * stride_oh, offs_m, stride_os, offs_d, SEQ_Q, True)
    do = _load_tile(DO + off_b * stride_db + off_h * stride_dh, offs_m, stride_ds, offs_d, SEQ_Q, True)
    tl.store(DELTA + off_bh.to(tl.int64) * SEQ_Q + offs_m, tl.sum(o * do, 1), mask=offs_m < SEQ_Q)


@autotuned(_DKDV_CONFIGS, _INTERP_CONFIG, _KEY)
@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, sm_scale,
                     stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                     stride_vb, stride_vs, stride_vh, stride_db, stride_ds, stride_dh,
                     stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh,
                     H, H_KV, GROUP, SEQ_Q, SEQ_K, seq_bucket,
                     HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr,
                     PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    off_bk = tl.program_id(1)
    off_b = (off_bk // H_KV).to(tl.int64)
    off_hk = off_bk % H_KV
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    k = _load_tile(K + off_b * stride_kb + off_hk * stride_kh, cols, stride_ks, offs_d, SEQ_K, DOT_FP32)
    v = _load_tile(V + off_b * stride_vb + off_hk * stride_vh, cols, stride_vs, offs_d, SEQ_K, DOT_FP32)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    lo = (start_n // BLOCK_M) * BLOCK_M if CAUSAL else 0  # earlier queries never see these keys
    # The kv head's gradient sums over every query head of its group: accumulated here, in registers.
    for g in range(0, GROUP):
        off_h = off_hk * GROUP + g
        q_base = Q + off_b * stride_qb + off_h * stride_qh
        do_base = DO + off_b * stride_db + off_h * stride_dh
        row_base = (off_b * H + off_h) * SEQ_Q
        for start_m in range(lo, SEQ_Q, BLOCK_M):
            rows = start_m + offs_m
            row_ok = rows < SEQ_Q
            q = _load_tile(q_base, rows, stride_qs, offs_d, SEQ_Q, DOT_FP32)
            do = _load_tile(do_base, rows, stride_ds, offs_d, SEQ_Q, DOT_FP32)
            lse = tl.load(LSE + row_base + rows, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + row_base + rows, mask=row_ok, other=0.0)
            qk_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # (keys, queries)
            valid = row_ok[None, :]
            if CAUSAL:
                valid = valid & (rows[None, :] >= cols[:, None])
            p_t = tl.where(valid, tl.exp2(qk_t - lse[None, :] * 1.4426950408889634), 0.0)
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    dk = dk * sm_scale
    _store_tile(DK + off_b * stride_dkb + off_hk * stride_dkh, cols, stride_dks, offs_d, SEQ_K, dk)
    _store_tile(DV + off_b * stride_dvb + off_hk * stride_dvh, cols, stride_dvs, offs_d, SEQ_K, dv)


@autotuned(_DQ_CONFIGS, _INTERP_CONFIG, _KEY)
@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, sm_scale,
                   stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                   stride_vb, stride_vs, stride_vh, stride_db, stride_ds, stride_dh,
                   stride_dqb, stride_dqs, stride_dqh,
                   H, GROUP, SEQ_Q, SEQ_K, seq_bucket,
                   HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr,
                   PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m, off_bh, off_b, off_h, off_hk = _query_program(H, GROUP, BLOCK_M)
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = rows < SEQ_Q
    q = _load_tile(Q + off_b * stride_qb + off_h * stride_qh, rows, stride_qs, offs_d, SEQ_Q, DOT_FP32)
    do = _load_tile(DO + off_b * stride_db + off_h * stride_dh, rows, stride_ds, offs_d, SEQ_Q, DOT_FP32)
    lse = tl.load(LSE + off_bh.to(tl.int64) * SEQ_Q + rows, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + off_bh.to(tl.int64) * SEQ_Q + rows, mask=row_ok, other=0.0)
    k_base = K + off_b * stride_kb + off_hk * stride_kh
    v_base = V + off_b * stride_vb + off_hk * stride_vh
    qk_scale = sm_scale * 1.4426950408889634
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    hi = tl.minimum(SEQ_K, start_m + BLOCK_M) if CAUSAL else SEQ_K
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        k = _load_tile(k_base, cols, stride_ks, offs_d, SEQ_K, DOT_FP32)
        v = _load_tile(v_base, cols, stride_vs, offs_d, SEQ_K, DOT_FP32)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        valid = cols[None, :] < SEQ_K
        if CAUSAL:
            valid = valid & (cols[None, :] <= rows[:, None])
        p = tl.where(valid, tl.exp2(qk - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    dq = dq * sm_scale
    _store_tile(DQ + off_b * stride_dqb + off_h * stride_dqh, rows, stride_dqs, offs_d, SEQ_Q, dq)


def _strides(t):
    return t.stride(0), t.stride(1), t.stride(2)


def _check(q, k, v):
    op = "flash_attention"
    check_float(op, q, k, v)
    check_device(op, q, k, v)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise Unsupported(f"{op}: expected q, k, v of shape (b, s, h, d); got {tuple(q.shape)}, "
                          f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise Unsupported(f"{op}: q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    b, sq, h, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise Unsupported(f"{op}: k {tuple(k.shape)} and v {tuple(v.shape)} must be (b={b}, s_k, h_kv, d={d})")
    if d not in HEAD_DIMS:
        raise Unsupported(f"{op}: head dim {d} ({DTYPE_NAMES[q.dtype]}) is not supported by the Triton kernel; "
                          f"supported: {', '.join(map(str, HEAD_DIMS))}")
    if h % k.shape[2]:
        raise Unsupported(f"{op}: {h} query heads are not a multiple of {k.shape[2]} key/value heads")
    check_nonempty(op, q)
    check_nonempty(op, k)


def _unit_last_stride(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _meta(q, k):
    """Constexprs shared by the launches, and the autotuning bucket of the sequence length."""
    dot_fp32 = dot_in_fp32(q.dtype)
    meta = dict(HEAD_DIM=q.shape[-1], DOT_FP32=dot_fp32, PRECISION="ieee" if dot_fp32 else dot_precision(q.dtype))
    return meta, next_pow2(max(q.shape[1], k.shape[1]))


def _forward(q, k, v, causal, scale):
    (b, sq, h, d), (sk, h_kv) = q.shape, k.shape[1:3]
    meta, bucket = _meta(q, k)
    o = new_empty(q.shape, q.dtype, q.device)
    lse = new_empty((b, h, sq), torch.float32, q.device)
    grid = lambda cfg: (triton.cdiv(sq, cfg["BLOCK_M"]), b * h)
    _fwd_kernel[grid](q, k, v, o, lse, scale, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
                      h, h // h_kv, sq, sk, bucket, CAUSAL=causal, **meta)
    return o, lse


def _backward(q, k, v, o, lse, do, causal, scale):
    (b, sq, h, d), (sk, h_kv) = q.shape, k.shape[1:3]
    meta, bucket = _meta(q, k)
    delta = new_empty((b, h, sq), torch.float32, q.device)
    block_m = min(128, 8192 // d)  # two (block_m, d) fp32 tiles in registers
    _bwd_delta_kernel[(triton.cdiv(sq, block_m), b * h)](o, do, delta, *_strides(o), *_strides(do), h, sq,
                                                        HEAD_DIM=d, BLOCK_M=block_m)
    dq = new_empty(q.shape, q.dtype, q.device)
    dk = new_empty(k.shape, k.dtype, k.device)
    dv = new_empty(v.shape, v.dtype, v.device)
    grid_kv = lambda cfg: (triton.cdiv(sk, cfg["BLOCK_N"]), b * h_kv)
    _bwd_dkdv_kernel[grid_kv](q, k, v, do, lse, delta, dk, dv, scale, *_strides(q), *_strides(k), *_strides(v),
                              *_strides(do), *_strides(dk), *_strides(dv), h, h_kv, h // h_kv, sq, sk, bucket,
                              CAUSAL=causal, **meta)
    grid_q = lambda cfg: (triton.cdiv(sq, cfg["BLOCK_M"]), b * h)
    _bwd_dq_kernel[grid_q](q, k, v, do, lse, delta, dq, scale, *_strides(q), *_strides(k), *_strides(v),
                           *_strides(do), *_strides(dq), h, h // h_kv, sq, sk, bucket, CAUSAL=causal, **meta)
    return dq, dk, dv


class FlashAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale):
        o, lse = _forward(q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.scale = causal, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, o, lse, _unit_last_stride(do), ctx.causal, ctx.scale)
        return dq, dk, dv, None, None


def flash_attention(q, k, v, causal=True, softmax_scale=None):
    """q (b, s_q, h, d); k, v (b, s_k, h_kv, d), h_kv dividing h; returns (b, s_q, h, d) in q's dtype.
    Raises Unsupported for head dims other than 16..256 in powers of two, or other dtypes than fp32/16, bf16."""
    _check(q, k, v)
    scale = float(softmax_scale) if softmax_scale is not None else q.shape[-1] ** -0.5
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    return FlashAttentionFunction.apply(q, k, v, bool(causal), scale)
