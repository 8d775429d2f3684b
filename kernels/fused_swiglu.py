"""SwiGLU (Shazeer 2020, "GLU Variants Improve Transformer"): silu(gate) * up, forward and backward, in one
elementwise pass each way. The backward recomputes sigmoid(gate) rather than saving it:

    d gate = dy * up * sig * (1 + gate * (1 - sig)),    d up = dy * gate * sig.
"""
import torch
import triton
import triton.language as tl

from ._common import check_device, check_float, check_nonempty, new_empty
from .dispatch import Unsupported

BLOCK = 1024


@triton.jit
def _sigmoid(x):
    e = tl.exp(-tl.abs(x))  # in (0, 1]: never overflows, whatever the sign of x
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _swiglu_fwd_kernel(G, U, Y, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    g = tl.load(G + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(Y + offs, (g * _sigmoid(g) * u).to(Y.dtype.element_ty), mask=ok)


@triton.jit
def _swiglu_bwd_kernel(G, U, DY, DG, DU, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    g = tl.load(G + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=ok, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=ok, other=0.0).to(tl.float32)
    sig = _sigmoid(g)
    tl.store(DG + offs, (dy * u * sig * (1.0 + g * (1.0 - sig))).to(DG.dtype.element_ty), mask=ok)
    tl.store(DU + offs, (dy * g * sig).to(DU.dtype.element_ty), mask=ok)


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        y = new_empty(gate.shape, gate.dtype, gate.device)
        n = gate.numel()
        _swiglu_fwd_kernel[(triton.cdiv(n, BLOCK),)](gate, up, y, n, BLOCK=BLOCK)
        ctx.save_for_backward(gate, up)
        return y

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        dy = dy.contiguous()
        dg = new_empty(gate.shape, gate.dtype, gate.device)
        du = new_empty(up.shape, up.dtype, up.device)
        n = gate.numel()
        _swiglu_bwd_kernel[(triton.cdiv(n, BLOCK),)](gate, up, dy, dg, du, n, BLOCK=BLOCK)
        return dg, du


def swiglu(gate, up):
    """silu(gate) * up in gate's dtype; gate and up of the same shape (no broadcasting)."""
    check_float("swiglu", gate, up)
    check_device("swiglu", gate, up)
    if gate.shape != up.shape:
        raise Unsupported(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
    check_nonempty("swiglu", gate)
    return SwiGLUFunction.apply(gate.contiguous(), up.contiguous())
