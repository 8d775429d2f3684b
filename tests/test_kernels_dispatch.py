"""Backend dispatch (docs/ARCHITECTURE.md 4.4): "auto" runs PyTorch on CPU tensors and Triton on CUDA ones with a
fallback for what Triton does not support; "triton" raises clearly instead, and on CPU needs
TRITON_INTERPRET=1; the per-call ``backend=`` beats the context; "apex" behaves as "auto" wherever apex
cannot run. The apex wrappers themselves are exercised against stand-in extension modules that follow
apex's and Megatron's interfaces (apex itself needs CUDA).
"""
import os
import subprocess
import sys
import types
import warnings

import pytest
import torch
import torch.nn.functional as F

from megagopher import kernels
from megagopher.kernels import Unsupported, apex_ops, dispatch, reference, triton_ops

# The apex stand-ins compute in fp32 and round to fp16, as apex does: fp16 tolerance (atol, rtol) against
# float64, as in test_kernels_softmax.py. Everything else here compares PyTorch with itself (exact or
# assert_close's fp32 defaults).
TOL_FP16 = (5e-3, 5e-3)


def _spy(monkeypatch, name):
    calls = []
    real = getattr(triton_ops, name)

    def spy(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)
    monkeypatch.setattr(triton_ops, name, spy)
    return calls


def test_triton_on_cpu_without_interpreter_says_how_to_fix():
    code = ("import torch\nfrom megagopher import kernels\n"
            "try:\n    kernels.rms_norm(torch.randn(2, 8), torch.ones(8), backend='triton')\n"
            "except RuntimeError as e:\n    print('ERROR:', e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "ERROR:" in out.stdout and "TRITON_INTERPRET=1" in out.stdout, out.stdout + out.stderr


def test_auto_on_cpu_runs_torch(monkeypatch):
    calls = _spy(monkeypatch, "rms_norm")
    x, w = torch.randn(3, 16), torch.randn(16)
    assert dispatch.resolve(x, "auto") == ("torch", False)
    with kernels.use_backend("auto"):
        torch.testing.assert_close(kernels.rms_norm(x, w), reference.rms_norm(x, w))
    assert calls == []


def test_per_call_backend_overrides_the_context(monkeypatch):
    calls = _spy(monkeypatch, "swiglu")
    g, u = torch.randn(10), torch.randn(10)
    with kernels.use_backend("torch"):
        kernels.swiglu(g, u, backend="triton")
    assert calls == ["swiglu"]
    with kernels.use_backend("triton"):
        kernels.swiglu(g, u, backend="torch")
        kernels.swiglu(g, u)
    assert calls == ["swiglu", "swiglu"]


def test_unsupported_raises_under_triton_and_falls_back_under_auto(monkeypatch):
    calls = _spy(monkeypatch, "flash_attention")
    real_resolve = dispatch.resolve

    def resolve_as_on_cuda(tensor, backend=None, op=None):  # "auto" picks Triton, as for a CUDA tensor
        if (backend or dispatch.current_backend()) == "auto":
            return "triton", False
        return real_resolve(tensor, backend, op)
    monkeypatch.setattr(kernels, "resolve", resolve_as_on_cuda)
    q = torch.randn(1, 5, 2, 20)  # head dim 20: not a multiple of 8
    with pytest.raises(Unsupported, match="head dim 20"):
        kernels.flash_attention(q, q, q, backend="triton")
    torch.testing.assert_close(kernels.flash_attention(q, q, q), reference.flash_attention(q, q, q))
    assert calls == ["flash_attention", "flash_attention"]  # tried, refused, fell back


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="valid: auto, triton, torch, apex"):
        with kernels.use_backend("cuda"):
            pass
    with pytest.raises(ValueError, match="unknown backend"):
        kernels.swiglu(torch.randn(3), torch.randn(3), backend="tritonn")


def test_public_functions_survive_the_kernel_modules_import():
    # a submodule named like a public function would replace it on the package once imported
    import megagopher.kernels.triton_ops  # noqa: F401
    for name in kernels.__all__:
        assert callable(getattr(kernels, name)) and not isinstance(getattr(kernels, name), types.ModuleType)


def test_apex_backend_behaves_as_auto_where_apex_cannot_run(monkeypatch):
    calls = _spy(monkeypatch, "layer_norm")
    x, w, b = torch.randn(4, 32), torch.randn(32), torch.randn(32)
    monkeypatch.setattr(dispatch, "apex_available", lambda: True)  # even with apex, a CPU tensor: auto
    with kernels.use_backend("apex"):
        torch.testing.assert_close(kernels.layer_norm(x, w, b), reference.layer_norm(x, w, b))
        torch.testing.assert_close(kernels.swiglu(x, x), reference.swiglu(x, x))
    assert calls == [] and dispatch.resolve(x, "apex", "layer_norm") == ("torch", False)


def _fake_apex(monkeypatch):
    """Stand-ins for apex's modules, with their call signatures and Megatron's -10000 masking."""
    fln = types.ModuleType("apex.normalization.fused_layer_norm")
    fln.fused_layer_norm_affine = lambda x, w, b, shape, eps: F.layer_norm(x.float(), shape, w.float(), b.float(), eps).to(x.dtype)
    fln.fused_layer_norm = lambda x, shape, eps: F.layer_norm(x.float(), shape, None, None, eps).to(x.dtype)
    fln.fused_rms_norm_affine = lambda x, w, shape, eps: reference.rms_norm(x, w, eps)
    fln.fused_rms_norm = lambda x, shape, eps: reference.rms_norm(x, torch.ones(shape, dtype=x.dtype), eps)
    masked = types.ModuleType("scaled_masked_softmax_cuda")
    masked.forward = lambda x, m, s: torch.softmax((x.float() * s).masked_fill(m, -10000.0), -1).to(x.dtype)
    masked.backward = lambda dy, y, s: (s * y.float() * (dy.float() - (dy.float() * y.float()).sum(-1, True))).to(y.dtype)
    masked.get_batch_per_block = lambda sq, sk, b, h: 4
    tri = types.ModuleType("scaled_upper_triang_masked_softmax_cuda")
    causal = lambda y: torch.ones(y.shape[-2:], dtype=torch.bool).triu(1)
    tri.forward = lambda x, s: masked.forward(x, causal(x), s)
    tri.backward = masked.backward
    for name, mod in [("apex", types.ModuleType("apex")), ("apex.normalization", types.ModuleType("apex.normalization")),
                      (fln.__name__, fln), (masked.__name__, masked), (tri.__name__, tri)]:
        monkeypatch.setitem(sys.modules, name, mod)


@pytest.mark.parametrize("causal,with_mask", [(True, False), (False, True), (True, True)])
def test_apex_softmax_wrapper_keeps_the_contract(monkeypatch, causal, with_mask):
    _fake_apex(monkeypatch)
    x = torch.randn(2, 2, 32, 32, dtype=torch.float16, requires_grad=True)
    mask = torch.rand(2, 1, 32, 32) < 0.3 if with_mask else None
    if with_mask:
        mask[1, 0, 5] = True  # a fully masked row: zeros, where Megatron's kernel gives a uniform row
    y = apex_ops.scaled_masked_softmax(x, mask, 0.5, causal)
    # a random upstream gradient: with ones (every row's sum) a softmax's input gradient is exactly zero
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
    y.backward(dy)
    x64 = x.detach().double().requires_grad_()
    y64 = reference.scaled_masked_softmax(x64, mask, 0.5, causal)
    y64.backward(dy.double())
    torch.testing.assert_close(y.double(), y64, atol=TOL_FP16[0], rtol=TOL_FP16[1])
    assert x64.grad.abs().max() > 0.1  # a gradient worth comparing
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=TOL_FP16[0], rtol=TOL_FP16[1])
    with pytest.raises(Unsupported):  # fp32 is not for Megatron's kernels: the call goes on as "auto"
        apex_ops.scaled_masked_softmax(x.detach().float(), mask, 0.5, causal)


def test_apex_norm_wrappers_route_to_apex(monkeypatch):
    _fake_apex(monkeypatch)
    x, w, b = torch.randn(3, 16), torch.randn(16), torch.randn(16)
    torch.testing.assert_close(apex_ops.layer_norm(x, w, b), reference.layer_norm(x, w, b))
    torch.testing.assert_close(apex_ops.rms_norm(x, w), reference.rms_norm(x, w))
    with pytest.raises(Unsupported, match="dtype"):
        apex_ops.rms_norm(x.half(), w)


_REFERENCE_ATTENTION = reference.flash_attention  # before any test replaces it with a spy


def _as_if_cuda(monkeypatch):
    """Make "auto" take the CUDA branch (Triton first) on CPU tensors; returns the reference calls made."""
    monkeypatch.setattr(kernels, "resolve", lambda tensor, backend=None, op=None: ("triton", False))
    monkeypatch.setattr(dispatch, "_warned", set())
    calls = []
    monkeypatch.setattr(reference, "flash_attention",
                        lambda *a, **k: calls.append(a[0].shape) or _REFERENCE_ATTENTION(*a, **k))
    return calls


def _qkv(h, h_kv, d, sq=9, sk=7):
    q = torch.randn(2, sq, h, d, requires_grad=True)
    k, v = (torch.randn(2, sk, h_kv, d, requires_grad=True) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("h,h_kv,causal", [(4, 2, True), (2, 2, False)])
def test_auto_sends_unsupported_attention_to_sdpa_not_the_reference(monkeypatch, h, h_kv, causal):
    calls = _as_if_cuda(monkeypatch)
    q, k, v = _qkv(h, h_kv, 44)  # head dim 44 is not a multiple of 8: the Triton kernel raises Unsupported
    with pytest.warns(RuntimeWarning) as record:
        out = kernels.flash_attention(q, k, v, causal=causal, softmax_scale=0.3)
    out.backward(torch.ones_like(out))
    assert calls == []  # never the O(s^2) fp32 reference
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    want = F.scaled_dot_product_attention(q2.transpose(1, 2), k2.transpose(1, 2), v2.transpose(1, 2),
                                          is_causal=causal, scale=0.3, enable_gqa=h != h_kv).transpose(1, 2)
    want.backward(torch.ones_like(want))
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    for got, expected in [(q.grad, q2.grad), (k.grad, k2.grad), (v.grad, v2.grad)]:
        torch.testing.assert_close(got, expected, atol=0, rtol=0)
    # and the semantics stay the reference's: top-left causal alignment, GQA by groups of query heads
    torch.testing.assert_close(out, _REFERENCE_ATTENTION(q, k, v, causal, 0.3), atol=1e-5, rtol=1e-5)
    message = str(record[0].message)
    assert len(record) == 1 and "flash_attention" in message and str((2, 9, h, 44)) in message
    assert "head dim 44" in message and "SDPA" in message


def test_fallback_warning_is_issued_once_per_reason(monkeypatch):
    _as_if_cuda(monkeypatch)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")  # count our warnings, not Python's once-per-location filter
        for _ in range(3):
            kernels.flash_attention(*_qkv(2, 2, 44))
        kernels.flash_attention(*_qkv(2, 2, 20))
    messages = [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 2, messages
    assert "head dim 44" in messages[0] and "head dim 20" in messages[1]


def test_cpu_auto_attention_still_runs_the_reference(monkeypatch):
    calls = []
    monkeypatch.setattr(reference, "flash_attention",
                        lambda *a, **k: calls.append(a[0].shape) or _REFERENCE_ATTENTION(*a, **k))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning: nothing fell back
        kernels.flash_attention(*_qkv(2, 2, 44))
    assert calls == [(2, 9, 2, 44)]
