"""Rotary position embedding (Su et al. 2021, "RoFormer"), GPT-NeoX/Llama "rotate half" convention, forward
and backward, out of place or in place.

With half = cos.shape[-1], channels [0, half) and [half, 2 half) of each head form the rotated pairs
(x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin); channels from 2 half on pass through unchanged (partial
rotary, as in GPT-J/CodeGen's rotary_dim). The backward is the inverse rotation: the same kernel with sin
negated. Each program rotates a block of head vectors (b, s, h), reading their rows of the small cos/sin
tables (which stay in cache).
"""
import torch
import triton
import triton.language as tl

from ._common import DTYPE_NAMES, check_device, check_float, check_nonempty, new_empty, next_pow2
from .dispatch import Unsupported


@triton.jit
def _rope_kernel(X, Y, COS, SIN, ROWS, SEQ, H, D, HALF,
                 stride_xb, stride_xs, stride_xh, stride_yb, stride_ys, stride_yh, stride_cs,
                 INVERSE: tl.constexpr, COPY_REST: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_REST: tl.constexpr):
    # rows are the (b, s, h) head vectors in order; each program rotates BLOCK_R of them
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = r < ROWS
    head = r % H
    tok = r // H
    s = tok % SEQ
    b = (tok // SEQ).to(tl.int64)
    x_row = X + b * stride_xb + s.to(tl.int64) * stride_xs + head * stride_xh
    y_row = Y + b * stride_yb + s.to(tl.int64) * stride_ys + head * stride_yh
    j = tl.arange(0, BLOCK_HALF)
    ok = row_ok[:, None] & (j[None, :] < HALF)
    cos = tl.load(COS + s[:, None] * stride_cs + j[None, :], mask=ok, other=0.0).to(tl.float32)
    sin = tl.load(SIN + s[:, None] * stride_cs + j[None, :], mask=ok, other=0.0).to(tl.float32)
    if INVERSE:
        sin = -sin
    x1 = tl.load(x_row[:, None] + j[None, :], mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(x_row[:, None] + HALF + j[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(y_row[:, None] + j[None, :], (x1 * cos - x2 * sin).to(Y.dtype.element_ty), mask=ok)
    tl.store(y_row[:, None] + HALF + j[None, :], (x2 * cos + x1 * sin).to(Y.dtype.element_ty), mask=ok)
    if COPY_REST:  # out of place: the channels past the rotary part are copied through
        for c0 in range(2 * HALF, D, BLOCK_REST):
            c = c0 + tl.arange(0, BLOCK_REST)
            ok_rest = row_ok[:, None] & (c[None, :] < D)
            rest = tl.load(x_row[:, None] + c[None, :], mask=ok_rest, other=0.0)
            tl.store(y_row[:, None] + c[None, :], rest.to(Y.dtype.element_ty), mask=ok_rest)


def _launch(x, y, cos, sin, inverse):
    b, s, h, d = x.shape
    half = cos.shape[-1]
    rows = b * s * h
    block_half = next_pow2(half)
    block_r = max(1, min(next_pow2(rows), 2048 // block_half))  # about 2k elements of each half per program
    copy_rest = (x.data_ptr() != y.data_ptr()) and 2 * half < d
    _rope_kernel[(triton.cdiv(rows, block_r),)](
        x, y, cos, sin, rows, s, h, d, half, *x.stride()[:3], *y.stride()[:3], cos.stride(0),
        INVERSE=inverse, COPY_REST=copy_rest, BLOCK_R=block_r, BLOCK_HALF=block_half,
        BLOCK_REST=min(next_pow2(max(d - 2 * half, 1)), 128))


class RopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin, inplace):
        y = x if inplace else new_empty(x.shape, x.dtype, x.device)
        _launch(x, y, cos, sin, inverse=False)
        ctx.save_for_backward(cos, sin)
        if inplace:
            ctx.mark_dirty(x)
        return y

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        dy = dy if dy.stride(-1) == 1 else dy.contiguous()
        dx = new_empty(dy.shape, dy.dtype, dy.device)
        _launch(dy, dx, cos, sin, inverse=True)
        return dx, None, None, None


def _check(x, cos, sin, inplace):
    op = "apply_rope_" if inplace else "apply_rope"
    check_float(op, x, cos, sin)
    check_device(op, x, cos, sin)
    if x.dim() != 4:
        raise Unsupported(f"{op}: expected x of shape (b, s, h, d), got {tuple(x.shape)} ({DTYPE_NAMES[x.dtype]})")
    s, d = x.shape[1], x.shape[3]
    if cos.shape != sin.shape or cos.dim() != 2 or cos.shape[0] != s or 2 * cos.shape[1] > d:
        raise Unsupported(f"{op}: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must both be "
                          f"(s={s}, rot_dim // 2) with rot_dim <= head dim {d}")
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        raise Unsupported(f"{op}: the Triton kernel gives no gradient to cos/sin; they require grad here")
    if inplace and x.stride(-1) != 1:
        raise Unsupported(f"{op}: in-place RoPE needs a unit stride on the head dim, got strides {x.stride()}")
    check_nonempty(op, x)


def _table(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def apply_rope(x, cos, sin):
    """Out of place: returns the rotated copy of x (b, s, h, d); cos, sin (s, rot_dim // 2)."""
    _check(x, cos, sin, inplace=False)
    x = x if x.stride(-1) == 1 else x.contiguous()
    return RopeFunction.apply(x, _table(cos), _table(sin), False)


def apply_rope_(x, cos, sin):
    """In place: rotates x's own memory (saving an activation-sized buffer) and returns x; differentiable
    as long as x is not a leaf that requires grad (autograd's rule for in-place ops)."""
    _check(x, cos, sin, inplace=True)
    return RopeFunction.apply(x, _table(cos), _table(sin), True)
