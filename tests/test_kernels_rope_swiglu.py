"""RoPE (out of place and in place, full and partial rotary) and SwiGLU Triton kernels, forward and backward,
under the interpreter on CPU, against the float64 reference, fp32 / fp16 / bf16, odd sizes, strided RoPE
input. Outputs and gradients are allocated poisoned (NaN).

Tolerances (atol, rtol) per dtype, |got - want| <= atol + rtol |want| elementwise against float64; both
kernels compute in fp32 and round once to the output dtype.
"""
import pytest
import torch

from megagopher import kernels
from megagopher.kernels import Unsupported, reference
from megagopher.kernels._common import poison_outputs
from megagopher.kernels.rope import apply_rope_
from megagopher.kernels.testing import assert_ok, compare, measure, stable_seed

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (5e-3, 5e-3), torch.bfloat16: (4e-2, 2e-2)}
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _tables(s, half, seed):
    g = torch.Generator().manual_seed(seed)
    angles = torch.rand(s, half, generator=g) * 6.3 * torch.arange(1, s + 1)[:, None]
    return angles.cos(), angles.sin()


# (x shape (b, s, h, d), rot_dim // 2, dtype)
ROPE = [
    ((3, 17, 4, 32), 16, F32),     # full rotary
    ((3, 17, 4, 32), 16, F16),
    ((2, 9, 3, 64), 8, BF16),      # partial rotary: 16 of 64 channels, the rest pass through
    ((1, 1, 5, 16), 4, F32),
    ((2, 5, 2, 48), 12, F16),      # head dim not a power of two
]


@pytest.mark.parametrize("shape,half,dtype", ROPE)
def test_rope_matches_reference(shape, half, dtype):
    seed = stable_seed(("rope", shape, half))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    cos, sin = _tables(shape[1], half, seed)
    checks = compare("apply_rope", (x, cos, sin), grad_args=(0,), names=("x",), tol=TOL[dtype], seed=seed)
    assert_ok(checks, f"rope {shape} half={half} {dtype}")


def test_rope_strided_input():
    qkv = torch.randn(2, 7, 3, 4, 32)
    x = qkv[:, :, 1]  # (b, s, h, d) view with a unit stride on d only
    cos, sin = _tables(7, 10, 0)
    assert_ok(compare("apply_rope", (x, cos, sin), grad_args=(0,), names=("x",), tol=TOL[F32]), "strided rope")


@pytest.mark.parametrize("dtype", [F32, F16])
def test_rope_in_place_matches_reference(dtype):
    g = torch.Generator().manual_seed(11)
    leaf = torch.randn(2, 9, 3, 32, generator=g).to(dtype).requires_grad_()
    cos, sin = _tables(9, 12, 11)
    upstream = torch.randn(2, 9, 3, 32, generator=g).to(dtype)
    with poison_outputs():
        x = leaf * 1  # in place needs a non-leaf
        y = apply_rope_(x, cos, sin)
        assert y.data_ptr() == x.data_ptr()
        (grad,) = torch.autograd.grad(y, leaf, upstream)
    ref_leaf = leaf.detach().double().requires_grad_()
    ref = reference.apply_rope(ref_leaf, cos.double(), sin.double())
    (ref_grad,) = torch.autograd.grad(ref, ref_leaf, upstream.double())
    assert_ok([measure("out", y, ref, *TOL[dtype]), measure("grad x", grad, ref_grad, *TOL[dtype])], "in-place rope")


def test_rope_refuses_tables_that_need_gradients():
    x = torch.randn(1, 4, 2, 16)
    cos, sin = _tables(4, 8, 0)
    with pytest.raises(Unsupported, match="cos/sin"):
        kernels.apply_rope(x, cos.requires_grad_(), sin, backend="triton")


SWIGLU = [((3, 17, 100), F32), ((3, 17, 100), F16), ((2, 5, 64), BF16), ((1,), F32), ((4099,), F16)]


@pytest.mark.parametrize("shape,dtype", SWIGLU)
def test_swiglu_matches_reference(shape, dtype):
    seed = stable_seed(("swiglu", shape))
    g = torch.Generator().manual_seed(seed)
    gate = (4 * torch.randn(shape, generator=g)).to(dtype)  # well into both tails of the sigmoid
    up = torch.randn(shape, generator=g).to(dtype)
    checks = compare("swiglu", (gate, up), grad_args=(0, 1), names=("gate", "up"), tol=TOL[dtype], seed=seed)
    assert_ok(checks, f"swiglu {shape} {dtype}")


def test_swiglu_extreme_gates_stay_finite():
    gate = torch.tensor([-1e4, -100.0, -20.0, 0.0, 20.0, 100.0, 1e4])
    checks = compare("swiglu", (gate, torch.ones(7)), grad_args=(0, 1), names=("gate", "up"), tol=TOL[F32])
    assert_ok(checks, "swiglu extreme gates")
