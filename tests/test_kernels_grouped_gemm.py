"""The grouped GEMM (kernels/grouped_gemm.py) under the Triton interpreter on CPU, forward and backward (dX,
dW), against a float64 loop over experts written here; awkward sizes: experts without rows (first, middle,
last), partial tiles, widths that are not multiples of the tile, no rows at all. Outputs and gradients are
allocated poisoned (NaN), so an element a kernel forgets to write fails.

Tolerances: fp32 inputs take exact fp32 products accumulated in fp32 over at most 40 terms (rtol/atol 1e-5 of
values of order 1); bf16 rounds the inputs and the output once (2e-2).
"""
import pytest
import torch

from megagopher import kernels
from megagopher.kernels._common import poison_outputs

TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (5e-2, 2e-2)}
CASES = [  # (tokens per expert, out, in, dtype)
    ([0, 5, 0, 19, 1, 0], 24, 40, torch.float32),  # empty experts around partial tiles, 17+ rows in one
    ([33, 0], 8, 7, torch.float32),  # three row tiles of 16, a last expert without rows, tiny widths
    ([0, 0, 0], 5, 9, torch.float32),  # no rows: Y is empty, dW all zeros
    ([3, 12], 18, 20, torch.bfloat16),
]


def _reference(x, w, counts):
    """Row r of expert e times W[e]^T, one expert at a time, in float64."""
    out, start = [], 0
    for e, n in enumerate(counts):
        out.append(x[start:start + n].double() @ w[e].double().t())
        start += n
    return torch.cat(out)


@pytest.mark.parametrize("counts,n_out,k_in,dtype", CASES)
def test_grouped_mm_forward_and_backward_match_float64(counts, n_out, k_in, dtype):
    g = torch.Generator().manual_seed(len(counts) * 1000 + n_out)
    x = torch.randn(sum(counts), k_in, generator=g).to(dtype).requires_grad_()
    w = torch.randn(len(counts), n_out, k_in, generator=g).to(dtype).requires_grad_()
    dy = torch.randn(sum(counts), n_out, generator=g).to(dtype)
    tokens = torch.tensor(counts)
    with poison_outputs():
        y = kernels.grouped_mm(x, w, tokens, backend="triton")
        y.backward(dy)
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    yr = _reference(xr, wr, counts)
    yr.backward(dy.double())
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(y.double(), yr, atol=atol, rtol=rtol)
    torch.testing.assert_close(x.grad.double(), xr.grad, atol=atol * 4, rtol=rtol)
    torch.testing.assert_close(w.grad.double(), wr.grad, atol=atol * 4, rtol=rtol)
    for e, n in enumerate(counts):
        if n == 0:
            assert torch.equal(w.grad[e], torch.zeros_like(w.grad[e])), f"expert {e} has no rows: dW must be 0"


def test_torch_backend_loop_matches_and_bad_counts_are_named():
    x, w = torch.randn(6, 4, dtype=torch.float64), torch.randn(3, 5, 4, dtype=torch.float64)
    torch.testing.assert_close(kernels.grouped_mm(x, w, torch.tensor([2, 0, 4]), backend="torch"),
                               _reference(x, w, [2, 0, 4]))
    with pytest.raises(ValueError, match="summing to the 6 rows of x"):
        kernels.grouped_mm(x, w, torch.tensor([2, 0, 3]))
    with pytest.raises(ValueError, match="one count per expert \\(3\\)"):
        kernels.grouped_mm(x, w, torch.tensor([6]))
    with pytest.raises(ValueError, match="x has 4 columns but the weight takes 3"):
        kernels.grouped_mm(x, w[..., :3], torch.tensor([2, 0, 4]))
