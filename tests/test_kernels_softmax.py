"""Scaled-masked softmax Triton kernel, forward and backward, under the interpreter on CPU, against the
float64 reference: key lengths that fit one block and ones that need the looping path (the interpreter's
block is 128 keys), masks broadcast over batch, heads and queries, causal with and without a mask, fully
masked rows (zeros, zero gradient), fp32 / fp16 / bf16. Outputs are allocated poisoned (NaN).

Tolerances (atol, rtol) per dtype, |got - want| <= atol + rtol |want| elementwise against float64; the
low-precision ones allow for the output (and the saved softmax the backward reads) being rounded to the
input dtype.
"""
import pytest
import torch

from megagopher import kernels
from megagopher.kernels.testing import assert_ok, compare, stable_seed

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (5e-3, 5e-3), torch.bfloat16: (4e-2, 2e-2)}
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

# (x shape (b, h, sq, sk), mask shape or None, causal, scale, dtype)
CASES = [
    ((3, 2, 17, 17), (3, 1, 17, 17), False, 0.7, F32),
    ((3, 2, 17, 17), None, True, 1.0, F16),
    ((1, 2, 5, 257), (1, 1, 1, 257), False, 1.3, F32),     # padding mask broadcast over heads and queries
    ((1, 2, 5, 257), (1, 1, 1, 257), False, 0.5, F16),
    ((1, 1, 130, 130), None, True, 0.125, F32),           # causal over the looping path
    ((1, 3, 9, 200), (9, 200), True, 2.0, BF16),           # 2-d mask and causal together
    ((3, 1, 4, 1), None, False, 1.0, F32),                 # a single key
    ((1, 1, 1, 1000), (1, 1, 1, 1000), False, 1.0, F16),   # a long row, eight blocks
]


def _inputs(shape, mask_shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(shape, generator=g)).to(dtype)
    mask = None if mask_shape is None else torch.rand(mask_shape, generator=g) < 0.3
    return x, mask


@pytest.mark.parametrize("shape,mask_shape,causal,scale,dtype", CASES)
def test_softmax_matches_reference(shape, mask_shape, causal, scale, dtype):
    seed = stable_seed((shape, mask_shape, causal))
    x, mask = _inputs(shape, mask_shape, dtype, seed)
    checks = compare("scaled_masked_softmax", (x,), dict(mask=mask, scale=scale, causal=causal), grad_args=(0,),
                     names=("x",), tol=TOL[dtype], seed=seed)
    assert_ok(checks, f"softmax {shape} mask={mask_shape} causal={causal} {dtype}")


@pytest.mark.parametrize("sk", [17, 300])  # one block, and the looping path
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_fully_masked_rows_are_zero_with_zero_gradient(sk, backend):
    x = torch.randn(2, 2, 6, sk, requires_grad=True)
    mask = torch.rand(2, 1, 6, sk) < 0.5
    mask[0, :, 2] = True  # row 2 of batch 0, all heads
    mask[1, :, 5] = True
    y = kernels.scaled_masked_softmax(x, mask=mask, scale=0.5, backend=backend)
    (y * torch.randn_like(y)).sum().backward()
    for b, i in ((0, 2), (1, 5)):
        assert torch.equal(y[b, :, i], torch.zeros_like(y[b, :, i]))
        assert torch.equal(x.grad[b, :, i], torch.zeros_like(x.grad[b, :, i]))
    live = ~mask.all(-1, keepdim=True).expand_as(y)
    torch.testing.assert_close(y.sum(-1)[live[..., 0]], torch.ones(int(live[..., 0].sum())))
