"""The Triton kernels compiled for a real GPU (skipped without CUDA, the one skip the kernel tests allow):
each op at training-like sizes in bf16 and fp16, forward and backward, against the float64 reference on
the same device ("auto" must pick Triton for these CUDA tensors). Outputs are allocated poisoned (NaN).
Written without a GPU at hand: these have not run yet.

Tolerances (atol, rtol) per dtype as in the interpreter tests: |got - want| <= atol + rtol |want|.
"""
import pytest
import torch

from megagopher.kernels import dispatch
from megagopher.kernels.testing import assert_ok, compare, stable_seed

TOL = {torch.float16: (5e-3, 5e-3), torch.bfloat16: (4e-2, 2e-2)}
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _rand(seed, *shape, scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g)).to(dtype).cuda()


def _cases(dtype, seed):
    mask = (torch.rand(2, 1, 300, 1000, generator=torch.Generator().manual_seed(seed)) < 0.2).cuda()
    labels = torch.randint(0, 32000, (1000,), generator=torch.Generator().manual_seed(seed)).cuda()
    ang = torch.rand(513, 32, generator=torch.Generator().manual_seed(seed)).cuda() * 513
    return {
        "attention causal gqa": ("flash_attention", (_rand(seed, 2, 1000, 8, 128, dtype=dtype),
                                 _rand(seed + 1, 2, 1000, 2, 128, dtype=dtype),
                                 _rand(seed + 2, 2, 1000, 2, 128, dtype=dtype)), dict(causal=True), (0, 1, 2)),
        "attention d64": ("flash_attention", (_rand(seed, 1, 777, 4, 64, dtype=dtype),) * 3, dict(causal=False), (0, 1, 2)),
        "softmax mask": ("scaled_masked_softmax", (_rand(seed, 2, 4, 300, 1000, scale=3.0, dtype=dtype),),
                         dict(mask=mask, scale=0.125), (0,)),
        "softmax causal long": ("scaled_masked_softmax", (_rand(seed, 1, 2, 64, 5000, dtype=dtype),),
                                dict(causal=True), (0,)),
        "rms_norm": ("rms_norm", (_rand(seed, 4096, 4096, dtype=dtype), _rand(seed + 1, 4096, dtype=dtype) + 1), {}, (0, 1)),
        "layer_norm": ("layer_norm", (_rand(seed, 1000, 5120, dtype=dtype), _rand(seed + 1, 5120, dtype=dtype) + 1,
                                      _rand(seed + 2, 5120, dtype=dtype)), {}, (0, 1, 2)),
        "rope partial": ("apply_rope", (_rand(seed, 2, 513, 8, 128, dtype=dtype), ang.cos(), ang.sin()), {}, (0,)),
        "swiglu": ("swiglu", (_rand(seed, 4096, 2753, scale=3.0, dtype=dtype), _rand(seed + 1, 4096, 2753, dtype=dtype)),
                   {}, (0, 1)),
        "cross_entropy": ("cross_entropy", (_rand(seed, 1000, 32000, scale=3.0, dtype=dtype), labels), {}, (0,)),
    }


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(_cases(torch.float16, 0)) if torch.cuda.is_available() else ["none"])
def test_kernel_on_gpu_matches_reference(name, dtype):
    seed = stable_seed(name)
    op, args, kwargs, grad_args = _cases(dtype, seed)[name]
    assert dispatch.resolve(args[0], "auto", op) == ("triton", False)
    # "auto" picks Triton here; the check itself runs "triton" so that an Unsupported cannot fall back unseen
    assert_ok(compare(op, args, kwargs, grad_args, tol=TOL[dtype], backend="triton", seed=seed), f"{name} {dtype}")
