"""Fused attention, forward and backward: FlashAttention-2 (Dao 2023, "FlashAttention-2: Faster Attention
with Better Parallelism and Work Partitioning"), for any head dim that is a multiple of 8 up to 256 (the values'
may differ from the queries' and keys': multi-head latent attention), with packed documents (flash-attn's
cu_seqlens) and sliding-window causal masks (window_size=(left, 0)).

Forward (here): one program per (query block, batch x head) streams the key/value blocks through an online
softmax (running max m and sum l, rescaling the accumulator), so the s x s score matrix never exists; it
saves the logsumexp of each row for the backward. Key blocks outside the rows' documents and windows are
skipped; only the blocks on a boundary pay for the mask (attention_tiles.block_ranges). The backward
(attention_bwd.py) recomputes P = exp(S - lse) blockwise in a dK/dV and a dQ kernel; no atomics.

flash_attention_forward / flash_attention_backward expose the two halves with the logsumexp, for ring
attention: the backward takes o and lse of a larger attention (the merged ring result), so the gradients of
one key block use the global softmax normaliser.

Grouped-query / multi-query attention reads kv head h // (h / h_kv) for query head h straight from K and V:
nothing is copied per head. Causal masking is top-left aligned (query i sees keys 0..i), as in the reference.
Scores are kept in base 2: sm_scale * log2 e is folded into Q once per program (not into every score tile),
so the exponentials are exp2 of the raw dot products.
"""
import torch
import triton
import triton.language as tl

from ._common import autotuned, new_empty
from .attention_bwd import backward
from .attention_args import check_key_bounds
from .attention_tiles import (FWD_TILES, INTERP_TILE, KEY, LOG2E, block_ranges, check_inputs, doc_bounds,
                              key_bounds, launch_meta, load_rows, operands, prune_by_head_dims, store_tile, strides,
                              unit_last_stride)


@triton.jit
def _query_program(H, GROUP, BLOCK_M: tl.constexpr):
    # A program over (query block, batch x head): its first query, batch x head, batch, head and the kv
    # head that query head shares (GQA/MQA), read in place.
    off_bh = tl.program_id(1)
    off_h = off_bh % H
    return tl.program_id(0) * BLOCK_M, off_bh, off_bh // H, off_h, off_h // GROUP


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, K, V, off_b, off_hk, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs,
               stride_vh, k_lo, k_hi, offs_n, lo, hi, gap_at, gap, SEQ_K, HEAD_DIM: tl.constexpr, D: tl.constexpr,
               HEAD_DIM_V: tl.constexpr, DV: tl.constexpr, MASKED: tl.constexpr, DOT_FP32: tl.constexpr,
               PRECISION: tl.constexpr, TMA: tl.constexpr, BLOCK_N: tl.constexpr):
    for step in range(lo, hi, BLOCK_N):
        first = step + tl.where(step >= gap_at, gap, 0)  # jumps the gap [gap_at, gap_at + gap)
        cols = first + offs_n
        k = load_rows(K, off_b, first, off_hk, stride_kb, stride_ks, stride_kh, SEQ_K, BLOCK_N, HEAD_DIM, D, DOT_FP32,
                      TMA)
        v = load_rows(V, off_b, first, off_hk, stride_vb, stride_vs, stride_vh, SEQ_K, BLOCK_N, HEAD_DIM_V, DV,
                      DOT_FP32, TMA)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # already scaled by sm_scale * log2 e
        if MASKED:  # only the blocks on a document, window or causal boundary pay for the mask
            valid = (cols[None, :] >= k_lo[:, None]) & (cols[None, :] < k_hi[:, None])
            qk = tl.where(valid, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            # A row that has seen no key yet (its document starts later in the block) keeps m = -inf:
            # exponentiate against 0 there, or -inf - -inf would be NaN.
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_use = m_new
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(qk - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@autotuned(FWD_TILES, INTERP_TILE, KEY, prune_by_head_dims)
@triton.jit
def _fwd_kernel(Q, stride_qb, stride_qs, stride_qh, K, stride_kb, stride_ks, stride_kh,
                V, stride_vb, stride_vs, stride_vh, O, LSE, DOC_START, DOC_END, stride_doc, qk_scale,
                stride_ob, stride_os, stride_oh, H, GROUP, SEQ_Q, SEQ_K, window, seq_bucket,
                HEAD_DIM: tl.constexpr, D: tl.constexpr, HEAD_DIM_V: tl.constexpr, DV: tl.constexpr,
                CAUSAL: tl.constexpr, VARLEN: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
                TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Q, K, V: tensor descriptors with TMA, else pointers (attention_tiles.operands); O a pointer.
    start_m, off_bh, off_b, off_h, off_hk = _query_program(H, GROUP, BLOCK_M)
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    q = load_rows(Q, off_b, start_m, off_h, stride_qb, stride_qs, stride_qh, SEQ_Q, BLOCK_M, HEAD_DIM, D, DOT_FP32,
                  TMA)
    q = (q.to(tl.float32) * qk_scale).to(q.dtype)
    k_lo, k_hi = key_bounds(rows, DOC_START + off_b * stride_doc, DOC_END + off_b * stride_doc, SEQ_Q, SEQ_K,
                            window, CAUSAL, VARLEN)
    start, full_start, full_end, end = block_ranges(k_lo, k_hi, rows < SEQ_Q, SEQ_K, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_V], tl.float32)
    # The unmasked blocks first, then one loop over the masked ones on either side of them (one loop rather
    # than two: each loop is pipelined separately, and a third at d=256 costs spills).
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, off_b, off_hk, stride_kb, stride_ks, stride_kh, stride_vb,
                               stride_vs, stride_vh, k_lo, k_hi, offs_n, full_start, full_end, full_end, 0, SEQ_K,
                               HEAD_DIM, D, HEAD_DIM_V, DV, False, DOT_FP32, PRECISION, TMA, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, off_b, off_hk, stride_kb, stride_ks, stride_kh, stride_vb,
                               stride_vs, stride_vh, k_lo, k_hi, offs_n, start, end - (full_end - full_start),
                               full_start, full_end - full_start, SEQ_K, HEAD_DIM, D, HEAD_DIM_V, DV, True, DOT_FP32,
                               PRECISION, TMA, BLOCK_N)
    # A row with no key at all (a window past the end of a shorter key sequence) outputs zeros, lse -inf.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    store_tile(O + off_b.to(tl.int64) * stride_ob + off_h * stride_oh, rows, stride_os, offs_dv, SEQ_Q, DV,
               acc / l_safe[:, None])
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)  # natural log
    tl.store(LSE + off_bh.to(tl.int64) * SEQ_Q + rows, lse, mask=rows < SEQ_Q)


def _forward(q, k, v, causal, scale, cu_seqlens, left, docs, bounds=False):
    """``docs``: per query the [start, end) of the keys its document spans, (s_q,) each for packed documents,
    or (b, s_q) with ``bounds``: key_bounds, the whole mask."""
    (b, sq, h, d), (sk, h_kv) = q.shape, k.shape[1:3]
    meta, window, bucket = launch_meta(q, k, causal, cu_seqlens, left, v)
    meta["VARLEN"] = meta["VARLEN"] or bounds
    o = new_empty((b, sq, h, v.shape[-1]), q.dtype, q.device)
    lse = new_empty((b, h, sq), torch.float32, q.device)
    grid = lambda cfg: (triton.cdiv(sq, cfg["BLOCK_M"]), b * h)
    _fwd_kernel[grid](*operands(meta, q, k, v), o, lse, *docs, sq if bounds else 0, scale * LOG2E, *strides(o),
                      h, h // h_kv, sq, sk, window, bucket, **meta)
    return o, lse


class FlashAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, cu_seqlens, left):
        docs = doc_bounds(cu_seqlens, q.shape[1], q.device)
        o, lse = _forward(q, k, v, causal, scale, cu_seqlens, left, docs)
        ctx.save_for_backward(q, k, v, o, lse, cu_seqlens, *docs)
        ctx.causal, ctx.scale, ctx.left = causal, scale, left
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cu_seqlens, *docs = ctx.saved_tensors
        dq, dk, dv = backward(q, k, v, o, lse, unit_last_stride(do), ctx.causal, ctx.scale, cu_seqlens, ctx.left,
                              docs)
        return dq, dk, dv, None, None, None, None


def _prepare(q, k, v, causal, softmax_scale, cu_seqlens, window_size):
    left = check_inputs(q, k, v, causal, cu_seqlens, window_size)
    scale = float(softmax_scale) if softmax_scale is not None else q.shape[-1] ** -0.5
    return [unit_last_stride(t) for t in (q, k, v)], bool(causal), scale, left


def flash_attention(q, k, v, causal=True, softmax_scale=None, cu_seqlens=None, window_size=None):
    """q (b, s_q, h, d); k (b, s_k, h_kv, d), v (b, s_k, h_kv, d_v), h_kv dividing h; returns (b, s_q, h, d_v)
    in q's dtype. With
    cu_seqlens (int32 (n + 1,)), b = 1 and the n documents packed in s attend only within themselves;
    window_size=(left, 0): query i sees keys i - left .. i. Raises Unsupported for head dims that are not
    multiples of 8 up to 256 (of q and k, or of v), or dtypes other than fp32/16, bf16."""
    (q, k, v), causal, scale, left = _prepare(q, k, v, causal, softmax_scale, cu_seqlens, window_size)
    return FlashAttentionFunction.apply(q, k, v, causal, scale, cu_seqlens, left)


def flash_attention_forward(q, k, v, causal=True, softmax_scale=None, cu_seqlens=None, window_size=None,
                            key_bounds=None):
    """(o, lse): the output and the fp32 (b, h, s_q) natural-log logsumexp of the scaled, masked scores."""
    (q, k, v), causal, scale, left = _prepare(q, k, v, causal, softmax_scale, cu_seqlens, window_size)
    check_key_bounds(q, k, causal, cu_seqlens, window_size, key_bounds)
    if key_bounds is not None:
        return _forward(q, k, v, False, scale, None, None, [t.contiguous() for t in key_bounds], bounds=True)
    return _forward(q, k, v, causal, scale, cu_seqlens, left, doc_bounds(cu_seqlens, q.shape[1], q.device))


def flash_attention_backward(q, k, v, o, lse, do, causal=True, softmax_scale=None, cu_seqlens=None,
                             window_size=None, key_bounds=None, query_bounds=None):
    """(dq, dk, dv) of attention(q, k, v) given the upstream do and the o and lse of the softmax these keys
    belong to, which may span more keys than k holds (ring attention's merged o and lse)."""
    (q, k, v), causal, scale, left = _prepare(q, k, v, causal, softmax_scale, cu_seqlens, window_size)
    check_key_bounds(q, k, causal, cu_seqlens, window_size, key_bounds, query_bounds)
    if key_bounds is not None and query_bounds is None:
        raise ValueError("flash_attention_backward: key_bounds need their query_bounds (the dK/dV kernel "
                         "visits keys, not queries)")
    o_shape = (*q.shape[:3], v.shape[-1])
    if o.shape != o_shape or lse.shape != (q.shape[0], q.shape[2], q.shape[1]) or do.shape != o_shape:
        raise ValueError(f"flash_attention_backward: o and do must be {o_shape} and lse "
                         f"{(q.shape[0], q.shape[2], q.shape[1])}; got {tuple(o.shape)}, {tuple(do.shape)}, "
                         f"{tuple(lse.shape)}")
    o, lse, do = unit_last_stride(o), lse.float().contiguous(), unit_last_stride(do)
    if key_bounds is not None:
        return backward(q, k, v, o, lse, do, False, scale, None, None, [t.contiguous() for t in key_bounds],
                        query_docs=[t.contiguous() for t in query_bounds])
    return backward(q, k, v, o, lse, do, causal, scale, cu_seqlens, left, doc_bounds(cu_seqlens, q.shape[1], q.device))
