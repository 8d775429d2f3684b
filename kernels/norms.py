"""RMSNorm (Zhang & Sennrich 2019) and LayerNorm (Ba et al. 2016), forward and backward.

Forward: each program normalises a block of whole rows held in registers (one row when it is wide, several
when narrow); the per-row rstd (and mean) is saved. Backward: each program walks a contiguous run of rows,
a block at a time, writing dx and keeping its share of the weight and bias gradients in registers; it stores that partial sum as one row of a (programs, n) fp32 buffer, which
is then summed over programs. No atomics, so no contention on dw and a deterministic result (the approach
of Triton's layer-norm tutorial and Liger-Kernel).
"""
import torch
import triton
import triton.language as tl

from ._common import check_device, check_float, check_nonempty, new_empty, next_pow2, rows_2d
from .dispatch import Unsupported

MAX_COLUMNS = 32768  # a row (and in the backward its dw, db shares) in registers; wider rows go to PyTorch


@triton.jit
def _norm_fwd_kernel(X, W, B, Y, MEAN, RSTD, stride_x, stride_y, M, N, eps,
                     IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    ok = row_ok[:, None] & (cols[None, :] < N)
    x = tl.load(X + rows.to(tl.int64)[:, None] * stride_x + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    if IS_RMS:
        xc = x
    else:
        mean = tl.sum(x, 1) / N
        xc = tl.where(ok, x - mean[:, None], 0.0)
        tl.store(MEAN + rows, mean, mask=row_ok)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / N + eps)
    tl.store(RSTD + rows, rstd, mask=row_ok)
    y = xc * rstd[:, None]
    if HAS_W:
        y = y * tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(B + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows.to(tl.int64)[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=ok)


@triton.jit
def _norm_bwd_kernel(X, W, DY, DX, MEAN, RSTD, DW_PARTIAL, DB_PARTIAL, stride_x, stride_dy, stride_dx,
                     M, N, rows_per_program, IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    # this program's share of dw and db, per row slot of the block; summed over the slots at the end
    dw = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    db = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    first = pid * rows_per_program
    for i in range(0, rows_per_program, BLOCK_M):
        slot = i + tl.arange(0, BLOCK_M)
        rows = (first + slot).to(tl.int64)
        row_ok = (slot < rows_per_program) & (rows < M)
        ok = row_ok[:, None] & col_ok[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        if IS_RMS:
            xhat = x * rstd[:, None]
        else:
            mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
            xhat = tl.where(ok, (x - mean[:, None]) * rstd[:, None], 0.0)
        if HAS_W:
            wdy = dy * w[None, :]
        else:
            wdy = dy
        # dx = rstd * (wdy - xhat * mean(xhat * wdy) [- mean(wdy) for LayerNorm])
        c1 = tl.sum(xhat * wdy, 1) / N
        if IS_RMS:
            dx = (wdy - xhat * c1[:, None]) * rstd[:, None]
        else:
            dx = (wdy - xhat * c1[:, None] - (tl.sum(wdy, 1) / N)[:, None]) * rstd[:, None]
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=ok)
        dw += dy * xhat
        db += dy
    if HAS_W:
        tl.store(DW_PARTIAL + pid * N + cols, tl.sum(dw, 0), mask=col_ok)
    if HAS_B:
        tl.store(DB_PARTIAL + pid * N + cols, tl.sum(db, 0), mask=col_ok)


def _programs(x2, block):
    # Enough programs to fill the GPU a few times over, each with many rows so the partial buffers stay
    # small; under the interpreter a handful (it runs them one after another anyway).
    if x2.is_cuda:
        sms = torch.cuda.get_device_properties(x2.device).multi_processor_count
        n = sms * (4 if block <= 4096 else 2)
    else:
        n = 4
    return max(1, min(n, x2.shape[0]))


def _warps(block):
    return 4 if block <= 2048 else (8 if block <= 8192 else 16)


def _rows_per_block(n_rows, block_n):
    # Narrow rows are handled several to a program (a 2-d block of about 4k elements); wide ones singly.
    return max(1, min(next_pow2(n_rows), 4096 // block_n))


class NormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, is_rms):
        x2 = rows_2d(x)
        m, n = x2.shape
        block = next_pow2(n)
        block_m = _rows_per_block(m, block)
        y = new_empty((m, n), x.dtype, x.device)
        rstd = new_empty((m,), torch.float32, x.device)
        mean = rstd if is_rms else new_empty((m,), torch.float32, x.device)
        _norm_fwd_kernel[(triton.cdiv(m, block_m),)](
            x2, weight if weight is not None else x2, bias if bias is not None else x2, y, mean, rstd,
            x2.stride(0), y.stride(0), m, n, eps, IS_RMS=is_rms, HAS_W=weight is not None,
            HAS_B=bias is not None, BLOCK_M=block_m, BLOCK_N=block, num_warps=_warps(block_m * block))
        ctx.save_for_backward(x2, weight, bias, mean, rstd)
        ctx.is_rms, ctx.shape = is_rms, x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, bias, mean, rstd = ctx.saved_tensors
        m, n = x2.shape
        dy2 = rows_2d(dy)
        block = next_pow2(n)
        programs = _programs(x2, block)
        rows_per_program = triton.cdiv(m, programs)
        programs = triton.cdiv(m, rows_per_program)  # no program left without rows
        block_m = _rows_per_block(rows_per_program, block)
        dx = new_empty((m, n), x2.dtype, x2.device)
        dw_partial = new_empty((programs, n), torch.float32, x2.device) if weight is not None else None
        db_partial = new_empty((programs, n), torch.float32, x2.device) if bias is not None else None
        _norm_bwd_kernel[(programs,)](x2, weight if weight is not None else x2, dy2, dx, mean, rstd,
                                      dw_partial if dw_partial is not None else dx,
                                      db_partial if db_partial is not None else dx,
                                      x2.stride(0), dy2.stride(0), dx.stride(0), m, n, rows_per_program,
                                      IS_RMS=ctx.is_rms, HAS_W=weight is not None, HAS_B=bias is not None,
                                      BLOCK_M=block_m, BLOCK_N=block, num_warps=_warps(block_m * block))
        dw = dw_partial.sum(0).to(weight.dtype) if weight is not None else None
        db = db_partial.sum(0).to(bias.dtype) if bias is not None else None
        return dx.view(ctx.shape), dw, db, None, None


def _check(op, x, weight, bias):
    check_float(op, x, weight, bias)
    check_device(op, x, weight, bias)
    n = x.shape[-1] if x.dim() else 0
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(p.shape) != (n,):
            raise Unsupported(f"{op}: {name} of shape {tuple(p.shape)} does not match the last dim {n} of x")
    if n > MAX_COLUMNS:
        raise Unsupported(f"{op}: rows of {n} columns exceed the Triton kernel's {MAX_COLUMNS}")
    check_nonempty(op, x)


def rms_norm(x, weight, eps=1e-5):
    _check("rms_norm", x, weight, None)
    return NormFunction.apply(x, weight.contiguous() if weight is not None else None, None, float(eps), True)


def layer_norm(x, weight, bias, eps=1e-5):
    _check("layer_norm", x, weight, bias)
    return NormFunction.apply(x, weight.contiguous() if weight is not None else None,
                              bias.contiguous() if bias is not None else None, float(eps), False)
