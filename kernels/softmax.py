"""Scaled-masked softmax, forward and backward, with Megatron's semantics (scale, then mask where True means
masked, then softmax in fp32; the causal variant builds the upper-triangular mask from indices and needs no
mask tensor) but without Megatron's limits: any key length (a row longer than one block is handled by an
online max/sum pass over key blocks, Milakov & Gimelshein 2018, then a normalising pass), fp32 input too,
and a fully masked row gives zeros (Megatron's kernel gives a uniform row there).

One program per row (b, h, i). The mask may broadcast over batch, heads and queries: it is read through
stride-0 views, never expanded in memory. Backward: dx = scale * y * (dy - sum(dy * y)).
"""
import torch
import triton
import triton.language as tl

from ._common import DTYPE_NAMES, check_device, check_float, check_nonempty, new_empty, next_pow2
from .dispatch import Unsupported, interpreter_on


@triton.jit
def _scores(x_row, m_row, cols, row_i, scale, SEQ_K, stride_mk, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr):
    # The scaled fp32 scores of keys ``cols`` of one row, and which of them count: inside the row, not
    # masked and, if causal, not after the query. Each pass applies ``keep`` in its own way. (Under the
    # interpreter, where the tests run, each call of a jitted helper costs some Python overhead; one
    # definition of which keys count is worth it.)
    keep = cols < SEQ_K
    s = tl.load(x_row + cols, mask=keep, other=0.0).to(tl.float32) * scale
    if CAUSAL:
        keep = keep & (cols <= row_i)
    if HAS_MASK:
        keep = keep & (tl.load(m_row + cols * stride_mk, mask=cols < SEQ_K, other=1) == 0)
    return s, keep


@triton.jit
def _softmax_fwd_kernel(X, MASK, Y, scale, H, SEQ_Q, SEQ_K, stride_mb, stride_mh, stride_mq, stride_mk,
                        HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, BLOCK: tl.constexpr,
                        SINGLE_BLOCK: tl.constexpr):
    row = tl.program_id(0)
    row_i = row % SEQ_Q
    bh = row // SEQ_Q
    x_row = X + row.to(tl.int64) * SEQ_K
    y_row = Y + row.to(tl.int64) * SEQ_K
    m_row = MASK + (bh // H).to(tl.int64) * stride_mb + (bh % H) * stride_mh + row_i.to(tl.int64) * stride_mq
    offs = tl.arange(0, BLOCK)
    if SINGLE_BLOCK:  # the row fits one block: it stays in registers
        s, keep = _scores(x_row, m_row, offs, row_i, scale, SEQ_K, stride_mk, HAS_MASK, CAUSAL)
        s = tl.where(keep, s, float("-inf"))
        m = tl.max(s, 0)
        e = tl.exp(s - tl.where(m == float("-inf"), 0.0, m))  # a fully masked row: all exp(-inf) = 0
        l = tl.sum(e, 0)
        tl.store(y_row + offs, (e / tl.where(l > 0, l, 1.0)).to(Y.dtype.element_ty), mask=offs < SEQ_K)
    else:
        # pass 1: online max and normaliser (Milakov & Gimelshein), kept per lane so the loop has no
        # reductions; the lanes are combined once at the end.
        m_lane = tl.full([BLOCK], float("-inf"), tl.float32)
        l_lane = tl.zeros([BLOCK], tl.float32)
        hi = tl.minimum(SEQ_K, row_i + 1) if CAUSAL else SEQ_K  # causal: later keys add nothing
        for start in range(0, hi, BLOCK):
            s, keep = _scores(x_row, m_row, start + offs, row_i, scale, SEQ_K, stride_mk, HAS_MASK, CAUSAL)
            s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_lane, s)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a lane masked so far stays at l = 0
            l_lane = l_lane * tl.exp(m_lane - m_safe) + tl.exp(s - m_safe)
            m_lane = m_new
        m = tl.max(m_lane, 0)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        l = tl.sum(l_lane * tl.exp(m_lane - m_safe), 0)
        # pass 2: every element is written, zeros where masked
        inv_l = 1.0 / tl.where(l > 0, l, 1.0)
        for start in range(0, SEQ_K, BLOCK):
            cols = start + offs
            s, keep = _scores(x_row, m_row, cols, row_i, scale, SEQ_K, stride_mk, HAS_MASK, CAUSAL)
            y = tl.where(keep, tl.exp(s - m_safe) * inv_l, 0.0)
            tl.store(y_row + cols, y.to(Y.dtype.element_ty), mask=cols < SEQ_K)


@triton.jit
def _y_and_dy(Y, DY, row, cols, SEQ_K):
    # The saved softmax and its gradient at ``cols`` of one row, in fp32, and which columns exist.
    ok = cols < SEQ_K
    y = tl.load(Y + row + cols, mask=ok, other=0.0).to(tl.float32)
    dy = tl.load(DY + row + cols, mask=ok, other=0.0).to(tl.float32)
    return y, dy, ok


@triton.jit
def _softmax_bwd_kernel(Y, DY, DX, scale, SEQ_K, BLOCK: tl.constexpr, SINGLE_BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * SEQ_K
    offs = tl.arange(0, BLOCK)
    if SINGLE_BLOCK:
        y, dy, ok = _y_and_dy(Y, DY, row, offs, SEQ_K)
        dx = scale * y * (dy - tl.sum(y * dy, 0))
        tl.store(DX + row + offs, dx.to(DX.dtype.element_ty), mask=ok)
    else:
        acc = tl.zeros([BLOCK], tl.float32)
        for start in range(0, SEQ_K, BLOCK):
            y, dy, ok = _y_and_dy(Y, DY, row, start + offs, SEQ_K)
            acc += y * dy
        dot = tl.sum(acc, 0)
        for start in range(0, SEQ_K, BLOCK):
            y, dy, ok = _y_and_dy(Y, DY, row, start + offs, SEQ_K)
            tl.store(DX + row + start + offs, (scale * y * (dy - dot)).to(DX.dtype.element_ty), mask=ok)


def launch(sk, forward, interpreted):
    """BLOCK, SINGLE_BLOCK and num_warps of the forward (or backward) kernel for rows of sk keys. GPU: up to
    4096 fp32 scores per row in registers, longer rows loop. The looping forward carries a running max and sum
    per lane through the loop: at 4096 lanes over 8 warps that spills on sm_100a (8 bytes, causal), so it takes
    16 warps there. The lanes, and so each lane's running max and sum, stay the same; only the final sum over
    the lanes is grouped by 16 warps instead of 8. The interpreter uses 128 so that test rows of a few hundred
    keys exercise the looping path too."""
    block = min(next_pow2(sk), 128 if interpreted else 4096)
    single = block >= sk
    warps = 4 if block <= 1024 else (16 if forward and not single and block >= 4096 else 8)
    return dict(BLOCK=block, SINGLE_BLOCK=single, num_warps=warps)


def gpu_launches(sk):
    """(kernel name, constexprs and num_warps) of the forward and backward launches for rows of sk keys on a
    GPU, as the wrappers below pick them: what tools/check_kernels.py compiles."""
    return [("_softmax_fwd_kernel", launch(sk, True, False)), ("_softmax_bwd_kernel", launch(sk, False, False))]


def _forward(x, mask, scale, causal):
    b, h, sq, sk = x.shape
    y = new_empty(x.shape, x.dtype, x.device)
    if mask is not None:
        mask = torch.broadcast_to(mask if mask.dtype == torch.bool else mask != 0, x.shape).view(torch.uint8)
        strides = mask.stride()
    else:
        mask, strides = x, (0, 0, 0, 0)  # never read: HAS_MASK is False
    _softmax_fwd_kernel[(b * h * sq,)](x, mask, y, scale, h, sq, sk, *strides, HAS_MASK=mask is not x,
                                       CAUSAL=causal, **launch(sk, True, interpreter_on()))
    return y


class ScaledMaskedSoftmaxFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mask, scale, causal):
        y = _forward(x, mask, scale, causal)
        ctx.save_for_backward(y)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        dy = dy.contiguous()
        dx = new_empty(y.shape, y.dtype, y.device)
        sk = y.shape[-1]
        _softmax_bwd_kernel[(y.numel() // sk,)](y, dy, dx, ctx.scale, sk, **launch(sk, False, interpreter_on()))
        return dx, None, None, None


def scaled_masked_softmax(x, mask=None, scale=1.0, causal=False):
    """x (b, h, sq, sk); mask broadcastable to x, True = masked. Returns softmax(scale * x, masked) in x's
    dtype; fully masked rows are zeros."""
    op = "scaled_masked_softmax"
    check_float(op, x)
    check_device(op, x, mask)
    if x.dim() != 4:
        raise Unsupported(f"{op}: expected x of shape (b, h, sq, sk), got {tuple(x.shape)} ({DTYPE_NAMES[x.dtype]})")
    if mask is not None:
        try:
            fits = torch.broadcast_shapes(mask.shape, x.shape) == x.shape
        except RuntimeError:
            fits = False
        if not fits:
            raise Unsupported(f"{op}: mask of shape {tuple(mask.shape)} does not broadcast to x {tuple(x.shape)}")
    check_nonempty(op, x)
    return ScaledMaskedSoftmaxFunction.apply(x.contiguous(), mask, float(scale), bool(causal))
