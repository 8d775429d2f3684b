"""FlashAttention-2 backward (Dao 2023, section 3.1.2 / algorithm 2): with delta_i = sum_d dO_id O_id, a dK/dV
kernel (one program per key block, looping over query blocks) and a dQ kernel (one program per query block,
looping over key blocks) recompute P = exp(S - lse) blockwise; no atomics. As in the forward, query/key blocks
outside the documents and windows are skipped, and only the blocks on a boundary pay for the mask: one loop
over the unmasked blocks, then one over the masked blocks on both sides of them (two loops, not three: each
loop is pipelined on its own, and at d=256 a third costs register spills). sm_scale * log2 e is folded into
the operand each program loads once (K in dK/dV, Q in dQ), not applied to every score tile.

dK/dV of a kv head sums over the query heads of its group. With many kv heads and keys one program per
(key block, kv head) loops over the group and keeps the sums in registers. With few (e.g. 8 kv heads split
over a TP group: b * h_kv * s_k / BLOCK_N programs far below the 132 SMs of an H100/H200) the group is split
over several programs, each writing an fp32 partial dK/dV for its query heads, summed afterwards. Partials
rather than atomics: the result stays deterministic, and the extra buffer (split x |dK|, fp32) is small
precisely when there are few programs to feed. DKDV_MIN_PROGRAMS sets the switch (a test sets it).
"""
import torch
import triton
import triton.language as tl

from ._common import autotuned, new_empty
from .attention_tiles import (DKDV_TILES, DQ_TILES, INTERP_TILE, KEY, LOG2E, block_ranges, key_bounds, launch_meta,
                              load_rows, load_tile, operands, prune_by_head_dims, query_bounds, store_tile, strides)

DKDV_MIN_PROGRAMS = 264  # two waves of 132 SMs: below it, the group's query heads are split over programs
# The largest BLOCK_N the autotuner may pick: the fewest dK/dV programs it may launch.
_DKDV_WIDEST_BLOCK_N = max(c.kwargs["BLOCK_N"] for c in DKDV_TILES)


@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, stride_ob, stride_os, stride_oh, stride_db, stride_ds, stride_dh,
                      H, SEQ_Q, HEAD_DIM: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr):
    # delta_i = sum_d dO_id * O_id = sum_j P_ij dP_ij, the row term of the softmax backward
    off_bh = tl.program_id(1)
    off_b, off_h = (off_bh // H).to(tl.int64), off_bh % H
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    o = load_tile(O + off_b * stride_ob + off_h * stride_oh, rows, stride_os, offs_d, SEQ_Q, D, True)
    do = load_tile(DO + off_b * stride_db + off_h * stride_dh, rows, stride_ds, offs_d, SEQ_Q, D, True)
    tl.store(DELTA + off_bh.to(tl.int64) * SEQ_Q + rows, tl.sum(o * do, 1), mask=rows < SEQ_Q)


@triton.jit
def _dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, off_b, h_first, heads, stride_qb, stride_qs, stride_qh, stride_db,
                stride_ds, stride_dh, cols, offs_m, lo, hi, gap_at, gap, DOC_START, DOC_END, H, SEQ_Q, SEQ_K, window,
                HEAD_DIM: tl.constexpr, D: tl.constexpr, HEAD_DIM_V: tl.constexpr, DV: tl.constexpr,
                MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                VARLEN: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr,
                BLOCK_M: tl.constexpr):
    # One flat loop over (query head, query block) pairs: heads h_first .. h_first + heads, blocks lo .. hi
    # (the same for every head). A loop over heads around a loop over blocks costs registers (both carry
    # dk, dv) that push the 64-key wgmma tile into spills.
    n_blocks = (hi - lo + BLOCK_M - 1) // BLOCK_M
    for it in range(0, heads * n_blocks):
        g = it // n_blocks
        step = lo + (it - g * n_blocks) * BLOCK_M
        off_h = h_first + g
        first = step + tl.where(step >= gap_at, gap, 0)  # jumps the gap [gap_at, gap_at + gap)
        rows = first + offs_m
        row_ok = rows < SEQ_Q
        row_base = (off_b.to(tl.int64) * H + off_h) * SEQ_Q
        q = load_rows(Q, off_b, first, off_h, stride_qb, stride_qs, stride_qh, SEQ_Q, BLOCK_M, HEAD_DIM, D, DOT_FP32,
                      TMA)
        do = load_rows(DO, off_b, first, off_h, stride_db, stride_ds, stride_dh, SEQ_Q, BLOCK_M, HEAD_DIM_V, DV,
                       DOT_FP32, TMA)
        lse = tl.load(LSE + row_base + rows, mask=row_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + row_base + rows, mask=row_ok, other=0.0)
        qk_t = tl.dot(k, tl.trans(q), input_precision=PRECISION)  # (keys, queries); K carries the scale
        p_t = tl.exp2(qk_t - lse[None, :])
        if MASKED:  # DOC_START/DOC_END: the rows' key ranges (this batch row's)
            k_lo, k_hi = key_bounds(rows, DOC_START, DOC_END, SEQ_Q, SEQ_K, window, CAUSAL, VARLEN)
            valid = (cols[:, None] >= k_lo[None, :]) & (cols[:, None] < k_hi[None, :])
            p_t = tl.where(valid, p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@autotuned(DKDV_TILES, INTERP_TILE, KEY, prune_by_head_dims)
@triton.jit
def _bwd_dkdv_kernel(Q, stride_qb, stride_qs, stride_qh, K, stride_kb, stride_ks, stride_kh,
                     V, stride_vb, stride_vs, stride_vh, DO, stride_db, stride_ds, stride_dh, LSE, DELTA, DK, DV_OUT,
                     DOC_START, DOC_END, Q_START, Q_END, stride_doc, stride_qdoc, sm_scale, qk_scale,
                     stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh,
                     H, GROUP, HEADS_PER_PROGRAM, SEQ_Q, SEQ_K, window, seq_bucket,
                     HEAD_DIM: tl.constexpr, D: tl.constexpr, HEAD_DIM_V: tl.constexpr, DV: tl.constexpr,
                     CAUSAL: tl.constexpr, VARLEN: tl.constexpr,
                     DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    # Program (key block, batch x part): part p covers query heads p * HEADS_PER_PROGRAM onwards, all of one
    # kv head's group, and writes dK/dV head p (the kv head itself when HEADS_PER_PROGRAM == GROUP).
    # DOC_START/DOC_END give each query its keys, Q_START/Q_END each key its queries: the same arrays for
    # packed documents, the two views of ring attention's key_bounds otherwise (one row each per batch row).
    # Q, K, V, DO: tensor descriptors with TMA, else pointers (attention_tiles.operands); DK, DV pointers.
    n_parts = H // HEADS_PER_PROGRAM
    off_b = tl.program_id(1) // n_parts
    DOC_START += off_b * stride_doc
    DOC_END += off_b * stride_doc
    off_part = tl.program_id(1) % n_parts
    off_hk = (off_part * HEADS_PER_PROGRAM) // GROUP
    start_n = tl.program_id(0) * BLOCK_N
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    k = load_rows(K, off_b, start_n, off_hk, stride_kb, stride_ks, stride_kh, SEQ_K, BLOCK_N, HEAD_DIM, D, DOT_FP32,
                  TMA)
    k = (k.to(tl.float32) * qk_scale).to(k.dtype)  # sm_scale * log2 e folded into K once
    v = load_rows(V, off_b, start_n, off_hk, stride_vb, stride_vs, stride_vh, SEQ_K, BLOCK_N, HEAD_DIM_V, DV,
                  DOT_FP32, TMA)
    q_lo, q_hi = query_bounds(cols, Q_START + off_b * stride_qdoc, Q_END + off_b * stride_qdoc, SEQ_Q, SEQ_K,
                              window, CAUSAL, VARLEN)
    start, full_start, full_end, end = block_ranges(q_lo, q_hi, cols < SEQ_K, SEQ_Q, BLOCK_M)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_V], tl.float32)
    h_first = off_part * HEADS_PER_PROGRAM
    dk, dv = _dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, off_b, h_first, HEADS_PER_PROGRAM, stride_qb, stride_qs,
                         stride_qh, stride_db, stride_ds, stride_dh, cols, offs_m, full_start, full_end, full_end, 0,
                         DOC_START, DOC_END, H, SEQ_Q, SEQ_K, window, HEAD_DIM, D, HEAD_DIM_V, DV, False, CAUSAL,
                         VARLEN, DOT_FP32, PRECISION, TMA, BLOCK_M)
    dk, dv = _dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, off_b, h_first, HEADS_PER_PROGRAM, stride_qb, stride_qs,
                         stride_qh, stride_db, stride_ds, stride_dh, cols, offs_m, start, end - (full_end - full_start),
                         full_start, full_end - full_start, DOC_START, DOC_END, H, SEQ_Q, SEQ_K, window, HEAD_DIM, D,
                         HEAD_DIM_V, DV, True, CAUSAL, VARLEN, DOT_FP32, PRECISION, TMA, BLOCK_M)
    off_b64 = off_b.to(tl.int64)
    store_tile(DK + off_b64 * stride_dkb + off_part * stride_dkh, cols, stride_dks, offs_d, SEQ_K, D, dk * sm_scale)
    store_tile(DV_OUT + off_b64 * stride_dvb + off_part * stride_dvh, cols, stride_dvs, offs_dv, SEQ_K, DV, dv)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, K, V, off_b, off_hk, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs,
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
        p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) - lse[:, None])  # Q carries the scale
        if MASKED:
            p = tl.where((cols[None, :] >= k_lo[:, None]) & (cols[None, :] < k_hi[:, None]), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@autotuned(DQ_TILES, INTERP_TILE, KEY, prune_by_head_dims)
@triton.jit
def _bwd_dq_kernel(Q, stride_qb, stride_qs, stride_qh, K, stride_kb, stride_ks, stride_kh,
                   V, stride_vb, stride_vs, stride_vh, DO, stride_db, stride_ds, stride_dh, LSE, DELTA, DQ,
                   DOC_START, DOC_END, stride_doc, sm_scale, qk_scale, stride_dqb, stride_dqs, stride_dqh,
                   H, GROUP, SEQ_Q, SEQ_K, window, seq_bucket,
                   HEAD_DIM: tl.constexpr, D: tl.constexpr, HEAD_DIM_V: tl.constexpr, DV: tl.constexpr,
                   CAUSAL: tl.constexpr, VARLEN: tl.constexpr,
                   DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    # Q, K, V, DO: tensor descriptors with TMA, else pointers (attention_tiles.operands); DQ a pointer.
    off_bh = tl.program_id(1)
    off_b, off_h = off_bh // H, off_bh % H
    off_hk = off_h // GROUP
    start_m = tl.program_id(0) * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = rows < SEQ_Q
    q = load_rows(Q, off_b, start_m, off_h, stride_qb, stride_qs, stride_qh, SEQ_Q, BLOCK_M, HEAD_DIM, D, DOT_FP32,
                  TMA)
    q = (q.to(tl.float32) * qk_scale).to(q.dtype)  # sm_scale * log2 e folded into Q once
    do = load_rows(DO, off_b, start_m, off_h, stride_db, stride_ds, stride_dh, SEQ_Q, BLOCK_M, HEAD_DIM_V, DV,
                   DOT_FP32, TMA)
    lse = tl.load(LSE + off_bh.to(tl.int64) * SEQ_Q + rows, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + off_bh.to(tl.int64) * SEQ_Q + rows, mask=row_ok, other=0.0)
    k_lo, k_hi = key_bounds(rows, DOC_START + off_b * stride_doc, DOC_END + off_b * stride_doc, SEQ_Q, SEQ_K,
                            window, CAUSAL, VARLEN)
    start, full_start, full_end, end = block_ranges(k_lo, k_hi, row_ok, SEQ_K, BLOCK_N)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    dq = _dq_inner(dq, q, do, lse, delta, K, V, off_b, off_hk, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs,
                   stride_vh, k_lo, k_hi, offs_n, full_start, full_end, full_end, 0, SEQ_K, HEAD_DIM, D, HEAD_DIM_V,
                   DV, False, DOT_FP32, PRECISION, TMA, BLOCK_N)
    dq = _dq_inner(dq, q, do, lse, delta, K, V, off_b, off_hk, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs,
                   stride_vh, k_lo, k_hi, offs_n, start, end - (full_end - full_start), full_start,
                   full_end - full_start, SEQ_K, HEAD_DIM, D, HEAD_DIM_V, DV, True, DOT_FP32, PRECISION, TMA, BLOCK_N)
    store_tile(DQ + off_b.to(tl.int64) * stride_dqb + off_h * stride_dqh, rows, stride_dqs, offs_d, SEQ_Q, D,
               dq * sm_scale)


def delta_launch(head_dim):
    """The delta kernel's rows per program and warps at a padded head dim: what ``backward`` launches and
    tools/check_kernels.py compiles. Two (rows, head_dim) fp32 tiles stay in registers: 8192 elements each up
    to d = 128, but at d = 256 the 32-row tiles spill on sm_90a and sm_100a (fp16: 232 and 236 bytes), so 16
    rows there. The layout along a row does not depend on the rows per program, so each row is summed in the
    same order: delta does not change."""
    return dict(BLOCK_M=min(128, (8192 if head_dim <= 128 else 4096) // head_dim), num_warps=4)


def dkdv_split(b, h_kv, group, sk):
    """How many programs share one kv head's group of query heads: the smallest divisor of the group that
    brings the dK/dV grid to DKDV_MIN_PROGRAMS (1: no split, the group's sum stays in registers)."""
    programs = b * h_kv * triton.cdiv(sk, _DKDV_WIDEST_BLOCK_N)
    for split in range(1, group + 1):
        if group % split == 0 and programs * split >= DKDV_MIN_PROGRAMS:
            return split
    return group


def _dkdv(q, k, v, do, lse, delta, scale, docs, query_docs, meta, window, bucket):
    (b, sq, h, d), (sk, h_kv), d_v = q.shape, k.shape[1:3], v.shape[-1]
    group = h // h_kv
    split = dkdv_split(b, h_kv, group, sk)
    if split == 1:
        dk, dv = new_empty(k.shape, k.dtype, k.device), new_empty(v.shape, v.dtype, v.device)
    else:  # fp32 partials, one per (kv head, part), summed over the parts below
        dk, dv = (new_empty((b, sk, h_kv * split, width), torch.float32, k.device) for width in (d, d_v))
    grid = lambda cfg: (triton.cdiv(sk, cfg["BLOCK_N"]), b * h_kv * split)
    bounds = query_docs is not docs  # key_bounds: (b, s) arrays, one row per batch row
    _bwd_dkdv_kernel[grid](*operands(meta, q, k, v, do), lse, delta, dk, dv, *docs, *query_docs, sq if bounds else 0,
                           sk if bounds else 0, scale, scale * LOG2E, *strides(dk), *strides(dv), h, group,
                           group // split, sq, sk, window, bucket, **meta)
    if split > 1:
        dk = dk.view(b, sk, h_kv, split, d).sum(3).to(k.dtype)
        dv = dv.view(b, sk, h_kv, split, d_v).sum(3).to(v.dtype)
    return dk, dv


def backward(q, k, v, o, lse, do, causal, scale, cu_seqlens, left, docs, query_docs=None):
    """(dq, dk, dv) from the forward's o and lse (or those of a larger, merged attention) and the upstream do.
    ``docs``: per query its keys' [start, end) (packed documents: (s,) each, also each key's queries);
    ``query_docs``: with key_bounds, (b, s_q) docs and (b, s_k) query_docs, the mask from both sides."""
    (b, sq, h, d), (sk, h_kv) = q.shape, k.shape[1:3]
    meta, window, bucket = launch_meta(q, k, causal, cu_seqlens, left, v)
    bounds = query_docs is not None
    meta["VARLEN"] = meta["VARLEN"] or bounds
    query_docs = query_docs if bounds else docs
    delta = new_empty((b, h, sq), torch.float32, q.device)
    launch = delta_launch(meta["HEAD_DIM_V"])  # o and do have the values' head dim
    _bwd_delta_kernel[(triton.cdiv(sq, launch["BLOCK_M"]), b * h)](o, do, delta, *strides(o), *strides(do), h, sq,
                                                                  HEAD_DIM=meta["HEAD_DIM_V"], D=meta["DV"], **launch)
    dk, dv = _dkdv(q, k, v, do, lse, delta, scale, docs, query_docs, meta, window, bucket)
    dq = new_empty(q.shape, q.dtype, q.device)
    grid_q = lambda cfg: (triton.cdiv(sq, cfg["BLOCK_M"]), b * h)
    _bwd_dq_kernel[grid_q](*operands(meta, q, k, v, do), lse, delta, dq, *docs, sq if bounds else 0, scale,
                           scale * LOG2E, *strides(dq), h, h // h_kv, sq, sk, window, bucket, **meta)
    return dq, dk, dv
