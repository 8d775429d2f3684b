"""Grouped GEMM for the MoE experts (model/moe_experts.py): the rows of X [N, K] are sorted by expert, the
expert e owning rows offs[e] .. offs[e + 1]; Y[r] = X[r] @ W[e]^T for W [E, out, K]. Forward and backward:

    dX = grouped(dY, W^T)   (the same kernel, W read through transposed strides)
    dW[e] = dY[e rows]^T @ X[e rows]   (one program per (expert, tile of W); an expert without rows gets 0)

The forward kernel's grid covers every expert's row tiles without a host round trip: at most
cdiv(N, BLOCK_M) + E tiles (each expert may end in a partial tile); a program finds its expert by walking the
offsets (E scalar steps) and returns when it is past the last tile. Products accumulate in fp32 (exact fp32
products for fp32 inputs, kernels/_common.dot_precision).
"""
import torch
import triton
import triton.language as tl

from ._common import autotuned, check_device, check_float, dot_in_fp32, dot_precision, new_empty
from .dispatch import Unsupported

# Each compiles spill-free for sm_90a and sm_100a, bf16 and fp16, in both kernels (tools/check_kernels.py); the
# list is unchanged since before that was checked on sm_100a, where the forward's 128 x 128 tile spilled 44
# bytes until the kernel addressed its tiles by int32 offsets (below). 128 x 128 with 4 warps spills (144 to 672
# bytes, sm_90a forward and sm_100a dW). 128 x 128 x 64 with 8 warps is now clean too, but is not added
# untimed: only a GPU run can say whether it beats the 32-deep K block.
_GPU_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
                for m, n, k, w, s in ((64, 128, 32, 8, 4), (128, 128, 32, 8, 3), (64, 64, 64, 4, 4),
                                      (128, 64, 32, 8, 4))]
_INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=4, num_stages=1)


@autotuned(_GPU_CONFIGS, _INTERPRETER_CONFIG, key=["n_out", "k_in", "DOT_FP32"])
@triton.jit
def _grouped_fwd_kernel(X, W, Y, OFFS, num_experts, n_out, k_in, stride_xm, stride_we, stride_wn, stride_wk,
                        stride_ym, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    tile = tl.program_id(0)
    expert, row_start, row_end, seen = -1, 0, 0, 0
    for e in range(num_experts):  # this tile's expert: the one whose running tile count passes it
        lo = tl.load(OFFS + e)
        hi = tl.load(OFFS + e + 1)
        tiles = tl.cdiv(hi - lo, BLOCK_M)
        mine = (tile >= seen) & (tile < seen + tiles)
        expert = tl.where(mine, e, expert)
        row_start = tl.where(mine, lo + (tile - seen) * BLOCK_M, row_start)
        row_end = tl.where(mine, hi, row_end)
        seen += tiles
    if expert < 0:
        return
    rows = row_start + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok, col_ok = rows < row_end, cols < n_out
    # Each tile is addressed as an int64 base (N * K and N * out may pass 2^31) plus int32 offsets inside it (one
    # expert's weight, a block of rows): tensors of int64 offsets cost twice the registers, and at 128 x 128 with
    # 8 warps (sm_100a) or 64 x 64 x 64 with 4 warps they made the kernel spill.
    local = tl.arange(0, BLOCK_M)
    x_tile = X + row_start.to(tl.int64) * stride_xm
    w_tile = W + expert.to(tl.int64) * stride_we
    x_off = local[:, None] * stride_xm + ks[None, :]
    w_off = cols[None, :] * stride_wn + ks[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k_in, BLOCK_K):
        k_ok = ks + k0 < k_in
        a = tl.load(x_tile + x_off, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_tile + w_off, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if DOT_FP32:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc += tl.dot(a, b, input_precision=PRECISION)
        x_tile += BLOCK_K
        w_tile += BLOCK_K * stride_wk
    y_ptr = Y + row_start.to(tl.int64) * stride_ym + (local[:, None] * stride_ym + cols[None, :])
    tl.store(y_ptr, acc.to(Y.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@autotuned(_GPU_CONFIGS, _INTERPRETER_CONFIG, key=["n_out", "k_in", "DOT_FP32"])
@triton.jit
def _grouped_dw_kernel(DY, X, DW, OFFS, n_out, k_in, stride_dym, stride_xm, stride_we, stride_wn,
                       DOT_FP32: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    expert = tl.program_id(0)
    tiles_k = tl.cdiv(k_in, BLOCK_K)
    n_tile, k_tile = tl.program_id(1) // tiles_k, tl.program_id(1) % tiles_k
    lo = tl.load(OFFS + expert)
    hi = tl.load(OFFS + expert + 1)
    cols = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = k_tile * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok, k_ok = cols < n_out, ks < k_in
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(lo, hi, BLOCK_M):  # no iteration for an expert without rows: its gradient is zero
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < hi
        dy = tl.load(DY + rows.to(tl.int64)[:, None] * stride_dym + cols[None, :],
                     mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        x = tl.load(X + rows.to(tl.int64)[:, None] * stride_xm + ks[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if DOT_FP32:
            dy, x = dy.to(tl.float32), x.to(tl.float32)
        acc += tl.dot(tl.trans(dy), x, input_precision=PRECISION)
    dw_ptr = DW + expert.to(tl.int64) * stride_we + cols[:, None] * stride_wn + ks[None, :]
    tl.store(dw_ptr, acc.to(DW.dtype.element_ty), mask=col_ok[:, None] & k_ok[None, :])


def _offsets(tokens_per_expert, device):
    counts = tokens_per_expert.to(device=device, dtype=torch.int32)
    return torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0, dtype=torch.int32)])


def _forward(x, weight, offs, transpose):
    """grouped(x, weight) (or with weight^T when ``transpose``): [N, out] where out = weight.shape[1] (or 2)."""
    n_out = weight.shape[2] if transpose else weight.shape[1]
    k_in = x.shape[1]
    y = new_empty((x.shape[0], n_out), x.dtype, x.device)
    num_experts = weight.shape[0]
    stride_wn, stride_wk = (weight.stride(2), weight.stride(1)) if transpose else (weight.stride(1), weight.stride(2))

    def grid(meta):
        return (triton.cdiv(x.shape[0], meta["BLOCK_M"]) + num_experts, triton.cdiv(n_out, meta["BLOCK_N"]))
    if x.shape[0]:
        _grouped_fwd_kernel[grid](x, weight, y, offs, num_experts, n_out, k_in, x.stride(0), weight.stride(0),
                                  stride_wn, stride_wk, y.stride(0), DOT_FP32=dot_in_fp32(x.dtype),
                                  PRECISION=dot_precision(x.dtype))
    return y


class GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, tokens_per_expert):
        offs = _offsets(tokens_per_expert, x.device)
        ctx.save_for_backward(x, weight, offs)
        return _forward(x, weight, offs, transpose=False)

    @staticmethod
    def backward(ctx, dy):
        x, weight, offs = ctx.saved_tensors
        dy = dy.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = _forward(dy, weight, offs, transpose=True)
        if ctx.needs_input_grad[1]:
            e, n_out, k_in = weight.shape
            dw = new_empty((e, n_out, k_in), weight.dtype, weight.device)

            def grid(meta):
                return (e, triton.cdiv(n_out, meta["BLOCK_N"]) * triton.cdiv(k_in, meta["BLOCK_K"]))
            _grouped_dw_kernel[grid](dy, x, dw, offs, n_out, k_in, dy.stride(0), x.stride(0), dw.stride(0),
                                     dw.stride(1), DOT_FP32=dot_in_fp32(x.dtype), PRECISION=dot_precision(x.dtype))
        return dx, dw, None


def grouped_mm(x, weight, tokens_per_expert):
    """The Triton grouped GEMM (kernels.grouped_mm checks the shapes first)."""
    check_float("grouped_mm", x, weight)
    check_device("grouped_mm", x, weight)
    if x.dtype != weight.dtype:
        raise Unsupported(f"grouped_mm: x is {x.dtype} but the weight is {weight.dtype}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    return GroupedMM.apply(x, weight, tokens_per_expert)
