"""The PyTorch paths of the grouped GEMM (kernels/grouped_gemm.py has the Triton one): a loop over the
experts (the CPU reference, and the ground truth of the kernel's tests, run in float64 there) and
``torch._grouped_mm`` (CUDA, bf16, where this torch has it).

grouped_mm(x [N, in], weight [E, out, in], tokens_per_expert [E]) -> [N, out]: the rows of x are grouped
by expert, tokens_per_expert[e] of them for expert e, in expert order; row r of expert e is
x[r] @ weight[e]^T. An expert with no rows contributes nothing (and gets a zero weight gradient).
"""
import torch


def check_grouped_args(x, weight, tokens_per_expert):
    """Shapes and counts, with errors that name the mismatch."""
    if x.dim() != 2 or weight.dim() != 3:
        raise ValueError(f"grouped_mm: x must be [N, in] and weight [E, out, in]; got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    if x.shape[1] != weight.shape[2]:
        raise ValueError(f"grouped_mm: x has {x.shape[1]} columns but the weight takes {weight.shape[2]} inputs")
    if tokens_per_expert.dim() != 1 or tokens_per_expert.numel() != weight.shape[0]:
        raise ValueError(f"grouped_mm: tokens_per_expert must have one count per expert ({weight.shape[0]}); got "
                         f"shape {tuple(tokens_per_expert.shape)}")
    total = int(tokens_per_expert.sum())
    if total != x.shape[0] or bool((tokens_per_expert < 0).any()):
        raise ValueError(f"grouped_mm: tokens_per_expert (sum {total}) must be non-negative counts summing to "
                         f"the {x.shape[0]} rows of x")


def grouped_mm_loop(x, weight, tokens_per_expert):
    """One GEMM per expert, in at least fp32; differentiable through autograd."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    parts = torch.split(x, tokens_per_expert.tolist())
    out = [p.to(dtype) @ weight[e].to(dtype).t() for e, p in enumerate(parts)]
    return torch.cat(out).to(x.dtype) if out else x.new_empty((0, weight.shape[1]))


def grouped_mm_torch(x, weight, tokens_per_expert):
    """``torch._grouped_mm`` (offsets: each expert's end row, int32 on the device); its weight operand is
    [E, in, out], a transposed view of ours."""
    offsets = torch.cumsum(tokens_per_expert.to(device=x.device, dtype=torch.int32), 0, dtype=torch.int32)
    return torch._grouped_mm(x, weight.transpose(1, 2), offs=offsets)


def grouped_mm_native_applies(x, weight):
    """Where torch._grouped_mm runs: CUDA, bf16, compute capability 9.0 or newer, 16-byte aligned rows."""
    return (hasattr(torch, "_grouped_mm") and x.is_cuda and x.dtype == weight.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(x.device)[0] >= 9
            and x.shape[1] % 8 == 0 and weight.shape[1] % 8 == 0)


def grouped_mm(x, weight, tokens_per_expert):
    """The "torch" backend of kernels.grouped_mm: ``torch._grouped_mm`` where it applies, else the loop."""
    if grouped_mm_native_applies(x, weight):
        return grouped_mm_torch(x, weight, tokens_per_expert)
    return grouped_mm_loop(x, weight, tokens_per_expert)
