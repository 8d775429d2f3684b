"""FlashAttention-2 Triton kernel, forward and backward, under the interpreter on CPU, against the float64
reference: awkward sequence lengths (1, 17, 129, 257, unequal q/k lengths), batch 3, GQA ratios 1, 2, 4,
causal and not, head dims 8..256 (powers of two and not, padded inside the kernel), fp32 / fp16 / bf16,
strided inputs. Outputs and gradients are
allocated poisoned (NaN), so an element the kernels do not write fails.

Tolerances (atol, rtol) per dtype, |got - want| <= atol + rtol |want| elementwise against float64:
fp32 at the level of fp32 accumulation; fp16/bf16 at a few units of the format's rounding, since P and
dS are rounded to the input dtype before their matmuls, as in FlashAttention itself.
"""
import pytest
import torch

from megagopher import kernels
from megagopher.kernels import Unsupported
from megagopher.kernels.testing import assert_ok, compare, stable_seed

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (5e-3, 5e-3), torch.bfloat16: (4e-2, 2e-2)}
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

# (batch, s_q, s_k, heads, kv heads, head dim, causal, dtype): a covering set rather than the full
# product, which the interpreter could not afford in CI.
CASES = [
    (3, 1, 1, 4, 4, 16, False, F32),
    (3, 1, 1, 4, 1, 32, True, F16),
    (3, 17, 17, 4, 2, 64, True, F32),
    (3, 17, 17, 4, 1, 32, False, F16),
    (1, 129, 129, 4, 1, 16, True, F16),
    (2, 129, 129, 2, 2, 32, False, F32),
    (1, 257, 257, 2, 1, 16, True, F32),
    (1, 257, 257, 1, 1, 32, False, F16),
    (3, 40, 40, 2, 1, 64, True, BF16),
    (1, 33, 70, 2, 2, 16, True, F32),    # fewer queries than keys (causal is top-left aligned)
    (1, 70, 33, 4, 2, 16, True, F16),    # more queries than keys
    (1, 17, 17, 1, 1, 128, False, F32),
    (1, 17, 17, 2, 1, 256, True, F16),
    # head dims that are multiples of 8 but not powers of two run padded to the next power of two
    (1, 40, 40, 2, 2, 80, True, BF16),   # CodeGen 2.7B's head dim
    (2, 33, 33, 4, 2, 48, False, F32),
    (1, 45, 45, 2, 1, 8, True, F16),     # padded to 16, tl.dot's smallest
    (1, 17, 17, 2, 2, 200, False, F32),
]


def _qkv(b, sq, sk, h, h_kv, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, sq, h, d, generator=g).to(dtype)
    k = torch.randn(b, sk, h_kv, d, generator=g).to(dtype)
    v = torch.randn(b, sk, h_kv, d, generator=g).to(dtype)
    return q, k, v


@pytest.mark.parametrize("b,sq,sk,h,h_kv,d,causal,dtype", CASES)
def test_flash_attention_matches_reference(b, sq, sk, h, h_kv, d, causal, dtype):
    seed = stable_seed((b, sq, sk, h, h_kv, d, causal))
    q, k, v = _qkv(b, sq, sk, h, h_kv, d, dtype, seed)
    checks = compare("flash_attention", (q, k, v), dict(causal=causal), grad_args=(0, 1, 2),
                     names=("q", "k", "v"), tol=TOL[dtype], seed=seed)
    assert_ok(checks, f"flash_attention b={b} sq={sq} sk={sk} h={h}/{h_kv} d={d} causal={causal} {dtype}")


def test_flash_attention_softmax_scale_and_strided_inputs():
    # q, k, v as views into one fused (b, s, 3, h, d) projection, as a model produces them: the kernels
    # read through the strides, nothing is made contiguous.
    g = torch.Generator().manual_seed(7)
    qkv = torch.randn(2, 45, 3, 2, 32, generator=g)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    assert not q.is_contiguous()
    checks = compare("flash_attention", (q, k, v), dict(causal=False, softmax_scale=0.3), grad_args=(0, 1, 2),
                     names=("q", "k", "v"), tol=TOL[F32], seed=7)
    assert_ok(checks, "strided q/k/v, softmax_scale=0.3")


@pytest.mark.parametrize("d", [12, 36, 264, 512])
def test_unsupported_head_dim_raises_under_triton(d):
    q = torch.randn(1, 4, 2, d)
    with pytest.raises(Unsupported, match=f"head dim {d}"):
        kernels.flash_attention(q, q, q, backend="triton")


def test_unsupported_dtype_raises_under_triton():
    q = torch.randn(1, 4, 2, 16, dtype=torch.float64)
    with pytest.raises(Unsupported, match="float64"):
        kernels.flash_attention(q, q, q, backend="triton")


def test_operands_take_descriptors_up_to_head_dim_128_and_copy_views_tma_cannot_address():
    from megagopher.kernels.attention_tiles import launch_meta, operands
    from triton.tools.tensor_descriptor import TensorDescriptor
    for d, tma in ((80, True), (128, True), (160, False)):
        q = torch.randn(1, 8, 2, d, dtype=BF16)
        meta = launch_meta(q, q, True, None, None)[0]
        assert meta["TMA"] is tma and isinstance(operands(meta, q)[0], TensorDescriptor) is tma
    # A view one element into its storage: its base is not 16-byte aligned, so TMA cannot read it in place.
    g = torch.Generator().manual_seed(11)
    flat = torch.randn(3 * 33 * 2 * 48 + 1, generator=g).to(F16)
    q, k, v = flat[1:].view(3, 33, 2, 48).unbind(0)
    q, k, v = (t.unsqueeze(0) for t in (q, k, v))
    assert q.data_ptr() % 16
    desc = operands(launch_meta(q, k, True, None, None)[0], q)[0]
    assert desc.base.data_ptr() % 16 == 0 and torch.equal(desc.base, q)
    checks = compare("flash_attention", (q, k, v), dict(causal=True), grad_args=(0, 1, 2), names=("q", "k", "v"),
                     tol=TOL[F16], seed=11)
    assert_ok(checks, "q, k, v views TMA cannot address in place")
