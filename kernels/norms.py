"""RMSNorm (Zhang & Sennrich 2019) and LayerNorm (Ba et al. 2016), forward and backward, optionally fused with
the residual add that feeds them (add_norm.py: s = x + residual, y = norm(s)).

Forward: each program normalises a block of whole rows held in registers (one row when it is wide, several
when narrow); the per-row rstd (and mean) is saved, and with a residual the sum s as well. Backward: each
program walks a contiguous run of rows, a block at a time, writing dx (plus ds, the gradient the residual
stream brings, when fused) and keeping its share of the weight and bias gradients in registers; it stores that
partial sum as one row of a (programs, n) fp32 buffer, which is then summed over programs. No atomics, so no
contention on dw and a deterministic result (the approach of Triton's layer-norm tutorial and Liger-Kernel).
A row wider than SINGLE_PASS_COLUMNS does not fit in registers beside those partial sums (it spills on sm_90a),
so there the backward is split: a first kernel reduces each row's c1 = mean(xhat * w dy) and c2 = mean(w dy),
and the second runs over (programs, column blocks) and reads them back. x and dy are then read twice (half
again the traffic of one pass when fused, two thirds more when not) in exchange for a backward without spills
at any width. The forward holds one row in registers: spill-free up to 16384 columns (tools/check_kernels.py).
"""
import torch
import triton
import triton.language as tl

from ._common import check_device, check_float, check_nonempty, new_empty, next_pow2, rows_2d
from .dispatch import Unsupported

MAX_COLUMNS = 32768  # wider rows go to PyTorch; at 32768 the forward's row spills (correct, slower)
SINGLE_PASS_COLUMNS = 4096  # widest row whose backward holds the row and its dw, db shares in registers


@triton.jit
def _norm_fwd_kernel(X, R, W, B, Y, S, MEAN, RSTD, stride_x, stride_r, stride_y, stride_s, M, N, eps,
                     IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    ok = row_ok[:, None] & (cols[None, :] < N)
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:  # s is rounded to the stream's dtype before the norm sees it, as in an unfused add
        r = tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        s = (x + r).to(S.dtype.element_ty)
        tl.store(S + rows[:, None] * stride_s + cols[None, :], s, mask=ok)
        x = s.to(tl.float32)
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
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=ok)


@triton.jit
def _weight(W, cols, col_ok, HAS_W: tl.constexpr, BLOCK_N: tl.constexpr):
    if HAS_W:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    else:
        w = tl.full([BLOCK_N], 1.0, tl.float32)  # multiplying by it folds away
    return w


@triton.jit
def _xhat_dy(X, DY, MEAN, RSTD, rows, cols, row_ok, ok, stride_x, stride_dy, IS_RMS: tl.constexpr):
    """The normalised input xhat, dy (both fp32) and rstd of a block of rows and columns."""
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
    if IS_RMS:
        xhat = x * rstd[:, None]
    else:
        mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
        xhat = tl.where(ok, (x - mean[:, None]) * rstd[:, None], 0.0)
    return xhat, dy, rstd


@triton.jit
def _norm_bwd_rows_kernel(X, W, DY, MEAN, RSTD, ROW_C, stride_x, stride_dy, M, N,
                          IS_RMS: tl.constexpr, HAS_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """c1 = mean(xhat * w dy) and c2 = mean(w dy) of each row, a column block at a time (rows too wide to
    hold whole), into ROW_C (M, 2)."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rows < M
    c1 = tl.zeros([BLOCK_M], tl.float32)
    c2 = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        ok = row_ok[:, None] & (cols[None, :] < N)
        xhat, dy, _ = _xhat_dy(X, DY, MEAN, RSTD, rows, cols, row_ok, ok, stride_x, stride_dy, IS_RMS)
        wdy = dy * _weight(W, cols, cols < N, HAS_W, BLOCK_N)[None, :]
        c1 += tl.sum(xhat * wdy, 1)
        c2 += tl.sum(wdy, 1)
    tl.store(ROW_C + 2 * rows, c1 / N, mask=row_ok)
    tl.store(ROW_C + 2 * rows + 1, c2 / N, mask=row_ok)


@triton.jit
def _norm_bwd_kernel(X, W, DY, DS, DX, MEAN, RSTD, ROW_C, DW_PARTIAL, DB_PARTIAL, stride_x, stride_dy, stride_ds,
                     stride_dx, M, N, rows_per_program, IS_RMS: tl.constexpr, HAS_W: tl.constexpr,
                     HAS_B: tl.constexpr, HAS_DS: tl.constexpr, SPLIT: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # one column block unless SPLIT
    col_ok = cols < N
    w = _weight(W, cols, col_ok, HAS_W, BLOCK_N)
    # this program's share of dw and db, per row slot of the block; summed over the slots at the end
    dw = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    db = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    first = pid * rows_per_program
    for i in range(0, rows_per_program, BLOCK_M):
        slot = i + tl.arange(0, BLOCK_M)
        rows = (first + slot).to(tl.int64)
        row_ok = (slot < rows_per_program) & (rows < M)
        ok = row_ok[:, None] & col_ok[None, :]
        xhat, dy, rstd = _xhat_dy(X, DY, MEAN, RSTD, rows, cols, row_ok, ok, stride_x, stride_dy, IS_RMS)
        wdy = dy * w[None, :]
        if SPLIT:  # the row's reductions span the other column blocks too: _norm_bwd_rows_kernel's
            c1 = tl.load(ROW_C + 2 * rows, mask=row_ok, other=0.0)
            c2 = tl.load(ROW_C + 2 * rows + 1, mask=row_ok, other=0.0)
        else:
            c1 = tl.sum(xhat * wdy, 1) / N
            c2 = tl.sum(wdy, 1) / N
        # dx = rstd * (wdy - xhat * c1 [- c2 for LayerNorm]) [+ ds: the residual stream's own gradient]
        if IS_RMS:
            dx = (wdy - xhat * c1[:, None]) * rstd[:, None]
        else:
            dx = (wdy - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        if HAS_DS:
            dx += tl.load(DS + rows[:, None] * stride_ds + cols[None, :], mask=ok, other=0.0).to(tl.float32)
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


def _fwd_params(m, n):
    block = next_pow2(n)
    block_m = _rows_per_block(m, block)
    return dict(BLOCK_M=block_m, BLOCK_N=block, num_warps=_warps(block_m * block))


def _bwd_params(rows_per_program, n):
    split = next_pow2(n) > SINGLE_PASS_COLUMNS
    block = SINGLE_PASS_COLUMNS if split else next_pow2(n)
    block_m = _rows_per_block(rows_per_program, block)
    return dict(SPLIT=split, BLOCK_M=block_m, BLOCK_N=block, num_warps=_warps(block_m * block))


def _rows_params():
    # c1, c2 of one row per program, a column block at a time; 8 warps spill 8 bytes on sm_100a (fp16 LayerNorm)
    return dict(BLOCK_M=1, BLOCK_N=SINGLE_PASS_COLUMNS, num_warps=16)


def gpu_launches(n, is_rms, fused):
    """(kernel name, constexprs and num_warps) of each launch for a training batch (many rows) of width n on a
    GPU, as the wrappers below pick them: what tools/check_kernels.py compiles."""
    flags = dict(IS_RMS=is_rms, HAS_W=True, HAS_B=not is_rms)
    bwd = _bwd_params(1 << 10, n)
    launches = [("_norm_fwd_kernel", dict(flags, HAS_RESIDUAL=fused, **_fwd_params(1 << 16, n)))]
    if bwd["SPLIT"]:
        launches.append(("_norm_bwd_rows_kernel", dict(IS_RMS=is_rms, HAS_W=True, **_rows_params())))
    return launches + [("_norm_bwd_kernel", dict(flags, HAS_DS=fused, **bwd))]


def norm_forward(x2, weight, bias, eps, is_rms, residual2=None):
    """y = norm(x2) of (rows, n) x2, or with ``residual2`` y = norm(s) and s = x2 + residual2; returns
    (y, s or None, mean, rstd); mean is rstd's buffer for RMSNorm."""
    m, n = x2.shape
    params = _fwd_params(m, n)
    y = new_empty((m, n), x2.dtype, x2.device)
    s = new_empty((m, n), x2.dtype, x2.device) if residual2 is not None else None
    rstd = new_empty((m,), torch.float32, x2.device)
    mean = rstd if is_rms else new_empty((m,), torch.float32, x2.device)
    r, s_out = (residual2, s) if s is not None else (x2, y)  # unused pointers when there is no residual
    _norm_fwd_kernel[(triton.cdiv(m, params["BLOCK_M"]),)](
        x2, r, weight if weight is not None else x2, bias if bias is not None else x2, y, s_out, mean, rstd,
        x2.stride(0), r.stride(0), y.stride(0), s_out.stride(0), m, n, eps, IS_RMS=is_rms,
        HAS_W=weight is not None, HAS_B=bias is not None, HAS_RESIDUAL=s is not None, **params)
    return y, s, mean, rstd


def norm_backward(x2, weight, bias, mean, rstd, dy2, is_rms, ds2=None):
    """(dx, dw, db) from the saved (rows, n) input x2 and statistics; ``ds2``, the gradient of the residual sum
    when fused, is added to dx. dw, db are None without weight, bias."""
    m, n = x2.shape
    programs = _programs(x2, next_pow2(n))
    rows_per_program = triton.cdiv(m, programs)
    programs = triton.cdiv(m, rows_per_program)  # no program left without rows
    params = _bwd_params(rows_per_program, n)
    w_arg = weight if weight is not None else x2
    row_c = new_empty((m, 2), torch.float32, x2.device) if params["SPLIT"] else rstd
    if params["SPLIT"]:
        _norm_bwd_rows_kernel[(m,)](x2, w_arg, dy2, mean, rstd, row_c, x2.stride(0), dy2.stride(0), m, n,
                                    IS_RMS=is_rms, HAS_W=weight is not None, **_rows_params())
    dx = new_empty((m, n), x2.dtype, x2.device)
    dw_partial = new_empty((programs, n), torch.float32, x2.device) if weight is not None else dx
    db_partial = new_empty((programs, n), torch.float32, x2.device) if bias is not None else dx
    ds_arg = ds2 if ds2 is not None else dy2
    _norm_bwd_kernel[(programs, triton.cdiv(n, params["BLOCK_N"]))](
        x2, w_arg, dy2, ds_arg, dx, mean, rstd, row_c, dw_partial, db_partial, x2.stride(0), dy2.stride(0),
        ds_arg.stride(0), dx.stride(0), m, n, rows_per_program, IS_RMS=is_rms, HAS_W=weight is not None,
        HAS_B=bias is not None, HAS_DS=ds2 is not None, **params)
    dw = dw_partial.sum(0).to(weight.dtype) if weight is not None else None
    db = db_partial.sum(0).to(bias.dtype) if bias is not None else None
    return dx, dw, db


class NormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, is_rms):
        x2 = rows_2d(x)
        y, _, mean, rstd = norm_forward(x2, weight, bias, eps, is_rms)
        ctx.save_for_backward(x2, weight, bias, mean, rstd)
        ctx.is_rms, ctx.shape = is_rms, x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, bias, mean, rstd = ctx.saved_tensors
        dx, dw, db = norm_backward(x2, weight, bias, mean, rstd, rows_2d(dy), ctx.is_rms)
        return dx.view(ctx.shape), dw, db, None, None


def check_norm(op, x, weight, bias):
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
    check_norm("rms_norm", x, weight, None)
    return NormFunction.apply(x, weight.contiguous() if weight is not None else None, None, float(eps), True)


def layer_norm(x, weight, bias, eps=1e-5):
    check_norm("layer_norm", x, weight, bias)
    return NormFunction.apply(x, weight.contiguous() if weight is not None else None,
                              bias.contiguous() if bias is not None else None, float(eps), False)
