"""Residual add fused into RMSNorm / LayerNorm (kernels.add_rms_norm, kernels.add_layer_norm): (y, s) with
s = x + residual and y = norm(s). The Triton kernels under the interpreter and the torch backend against the
float64 reference, forward and backward, with upstream gradients on both y and s (dx = dresidual = ds +
dnorm(dy)); outputs and gradients allocated poisoned (NaN). Sizes are awkward: 1, 7 and 33 rows, widths that
are not powers of two, 5120 (wider than one backward block: the split backward). Tolerances are
test_kernels_norms.py's. Then: one output left unused, x and residual as separate leaves (and as one),
inputs the kernel does not take, and the model, whose fused layers give the unfused model's loss and
gradients.
"""
import re

import pytest
import torch

from megagopher import kernels
from megagopher.kernels import norms, reference
from megagopher.kernels.dispatch import Unsupported
from megagopher.kernels.testing import assert_ok, compare, stable_seed
from megagopher.model import GPTConfig, GPTModel

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (5e-3, 5e-3), torch.bfloat16: (4e-2, 2e-2)}
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

# (x shape, dtype of x and residual, parameter dtype)
SHAPES = [
    ((1, 1000), F32, F32),
    ((7, 1000), F16, F16),
    ((33, 200), BF16, BF16),
    ((3, 11, 96), BF16, F32),  # mixed: bf16 stream, fp32 parameters
    ((7, 5120), F32, F32),     # two column blocks in the backward, the second ragged
    ((1, 5000), BF16, BF16),
]


def _inputs(shape, dtype, pdtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (2 * torch.randn(shape, generator=g) + 0.5).to(dtype)
    residual = (torch.randn(shape, generator=g) - 0.25).to(dtype)
    w = (1 + 0.5 * torch.randn(shape[-1], generator=g)).to(pdtype)
    b = (0.5 * torch.randn(shape[-1], generator=g)).to(pdtype)
    return x, residual, w, b


def _check(op, shape, dtype, pdtype, backend):
    seed = stable_seed((op, shape, backend))
    x, residual, w, b = _inputs(shape, dtype, pdtype, seed)
    if op == "add_rms_norm":
        args, names = (x, residual, w), ("x", "residual", "weight")
    else:
        args, names = (x, residual, w, b), ("x", "residual", "weight", "bias")
    checks = compare(op, args, dict(eps=1e-5), grad_args=tuple(range(len(args))), names=names,
                     tol=TOL[dtype], backend=backend, seed=seed)
    assert [c.name for c in checks[:2]] == ["out", "out 1"]  # y and s both checked
    assert_ok(checks, f"{op} {shape} {dtype} params {pdtype} backend {backend}")


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("shape,dtype,pdtype", SHAPES)
@pytest.mark.parametrize("op", ["add_rms_norm", "add_layer_norm"])
def test_add_norm_matches_reference(op, shape, dtype, pdtype, backend):
    _check(op, shape, dtype, pdtype, backend)


@pytest.mark.parametrize("op", ["add_rms_norm", "add_layer_norm"])
def test_split_backward_over_many_column_blocks(op, monkeypatch):
    # 200 columns in blocks of 64: four blocks per row, the last ragged, rows reduced by the first kernel
    monkeypatch.setattr(norms, "SINGLE_PASS_COLUMNS", 64)
    _check(op, (33, 200), F16, F32, "triton")


def test_norm_sees_the_rounded_sum():
    """s is rounded to the stream's dtype before it is normalised, as an add and then a norm would do: fp16
    values 2050 + 2k (fp16's spacing there is 2) plus residuals under 1 round back to x, and LayerNorm's mean
    subtraction makes the rounded and the exact sum's norms differ by far more than the output's rounding
    (RMSNorm, scale-invariant, cannot tell them apart; it shares the kernel's add). fp16, not bf16: the
    interpreter truncates fp32 to bf16, where a GPU rounds to nearest."""
    g = torch.Generator().manual_seed(7)
    x = (2050 + 2 * torch.randint(0, 9, (5, 300), generator=g)).to(F16)
    residual = (1.8 * torch.rand((5, 300), generator=g) - 0.9).to(F16)
    w, b = torch.ones(300), torch.zeros(300)
    y, s = kernels.add_layer_norm(x, residual, w, b, backend="triton")
    assert torch.equal(s, x)
    want, _ = reference.add_layer_norm(x, residual, w, b)  # rounds s, then normalises in fp32
    torch.testing.assert_close(y, want, rtol=1e-2, atol=1e-2)
    exact, _ = reference.add_layer_norm(x.double(), residual.double(), w.double(), b.double())
    assert (y.double() - exact).abs().max() > 0.05  # the test can tell the two apart


def _leaves(shape=(7, 1000), seed=5):
    x, residual, w, b = _inputs(shape, F32, F32, seed)
    return [t.clone().requires_grad_() for t in (x, residual, w, b)]


@pytest.mark.parametrize("used", ["y", "s"])
def test_one_output_unused(used):
    """Only y (the norm feeds the branch, s is dropped) or only s: the unused gradient is None inside."""
    grads = []
    for fn in (lambda *a: kernels.add_layer_norm(*a, backend="triton"), reference.add_layer_norm):
        x, residual, w, b = _leaves()
        y, s = fn(x, residual, w, b)
        out = y if used == "y" else s
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        (out * upstream).sum().backward()
        grads.append([x.grad, residual.grad, w.grad, b.grad])
    (gx, gr, gw, gb), (rx, rr, rw, rb) = grads
    torch.testing.assert_close(gx, rx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gr, rr, rtol=1e-5, atol=1e-5)
    if used == "y":
        torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(gb, rb, rtol=1e-5, atol=1e-4)
    else:  # the norm's output is unused: no gradient reaches its parameters
        assert gw is None and gb is None


def test_separate_leaves_accumulate_separately():
    """x and residual get one gradient tensor from the kernel; as leaves each still accumulates on its own."""
    x, residual, w, _ = _leaves()
    for _ in range(2):
        y, s = kernels.add_rms_norm(x, residual, w, backend="triton")
        (y.sum() + 3 * s.sum()).backward()
    assert x.grad.data_ptr() != residual.grad.data_ptr()
    torch.testing.assert_close(x.grad, residual.grad, rtol=0, atol=0)
    xr, rr, wr, _ = _leaves()
    for _ in range(2):
        yr, sr = reference.add_rms_norm(xr, rr, wr)
        (yr.sum() + 3 * sr.sum()).backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad, wr.grad, rtol=1e-5, atol=1e-4)
    x.grad.add_(1.0)  # accumulating into one leaf's gradient must leave the other's alone
    assert not torch.equal(x.grad, residual.grad)


def test_same_tensor_as_x_and_residual():
    x, _, w, _ = _leaves()
    y, s = kernels.add_rms_norm(x, x, w, backend="triton")
    (y.sum() + s.sum()).backward()
    xr, _, wr, _ = _leaves()
    yr, sr = reference.add_rms_norm(xr, xr, wr)
    (yr.sum() + sr.sum()).backward()
    torch.testing.assert_close(s, sr, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)  # both addends' gradients summed


def test_inputs_the_kernel_does_not_take():
    x, residual, w, _ = _inputs((4, 64), F32, F32, seed=2)
    cases = [(residual.to(BF16), "bfloat16"), (residual[:, :32], "(4, 32)"), (residual[:1], "(1, 64)")]
    for bad, named in cases:
        with pytest.raises(Unsupported, match=r"add_rms_norm: residual .*" + re.escape(named)):
            kernels.add_rms_norm(x, bad, w, backend="triton")
    # the reference (the torch path, and auto's fallback) broadcasts and promotes; s keeps x's dtype
    y, s = kernels.add_rms_norm(x, residual.to(BF16), w, backend="torch")
    assert s.dtype == F32 and torch.equal(s, x + residual.to(BF16).float())
    with pytest.raises(Unsupported, match="weight of shape"):
        kernels.add_layer_norm(x, residual, w[:8], None, backend="triton")


def test_auto_falls_back_to_the_reference_with_a_warning(monkeypatch):
    """On CUDA "auto" runs Triton; an input it does not take (here a bf16 residual beside an fp32 x) goes to
    the reference, which promotes, with the one-time warning."""
    real_resolve = kernels.resolve
    monkeypatch.setattr(kernels, "resolve", lambda t, backend=None, op=None: ("triton", False)
                        if (backend or kernels.current_backend()) == "auto" else real_resolve(t, backend, op))
    x, residual, w, b = _inputs((3, 40), F32, F32, seed=4)
    with pytest.warns(RuntimeWarning, match="kernels.add_layer_norm: .*the PyTorch reference.*bfloat16"):
        y, s = kernels.add_layer_norm(x, residual.to(BF16), w, b)
    want_y, want_s = reference.add_layer_norm(x, residual.to(BF16), w, b)
    assert torch.equal(y, want_y) and torch.equal(s, want_s)


def _model_grads(cfg, fused, monkeypatch):
    """Loss and gradients of a tiny model under the Triton kernels; ``fused=False`` replaces the fused calls
    by the add then the norm, the layer's math before the fusion."""
    calls = []
    if fused:
        for name in ("add_rms_norm", "add_layer_norm"):
            fn = getattr(kernels, name)
            monkeypatch.setattr(kernels, name, lambda *a, _fn=fn, **k: calls.append(1) or _fn(*a, **k))
    else:
        monkeypatch.setattr(kernels, "add_rms_norm", lambda x, r, w, eps: (kernels.rms_norm(x + r, w, eps), x + r))
        monkeypatch.setattr(kernels, "add_layer_norm",
                            lambda x, r, w, b, eps: (kernels.layer_norm(x + r, w, b, eps), x + r))
    model = GPTModel(cfg).initialize(1)
    ids = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length + 1), generator=torch.Generator().manual_seed(3))
    with kernels.use_backend("triton"):
        loss = model(ids[:, :-1], labels=ids[:, 1:]).mean()
        loss.backward()
    monkeypatch.undo()
    assert len(calls) == (cfg.num_layers if fused else 0)
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("normalization", ["rmsnorm", "layernorm"])
def test_model_fused_matches_unfused(normalization, monkeypatch):
    cfg = GPTConfig(num_layers=2, hidden_size=32, num_attention_heads=2, seq_length=16, vocab_size=50,
                    make_vocab_size_divisible_by=8, normalization=normalization, parallel_residual=False)
    loss, grads = _model_grads(cfg, True, monkeypatch)
    ref_loss, ref_grads = _model_grads(cfg, False, monkeypatch)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
