"""The Triton kernels compiled for a real GPU (skipped without CUDA, the one skip the kernel tests allow),
forward and backward against float64 on the same device, at training-like, awkward sizes. Outputs are
allocated poisoned (NaN). Written without a GPU at hand: dry-run on CPU through the interpreter only.
The tests are marked ``gpu``: under README's ``python -m pytest tests`` (an interpreted session) they run
compiled in a child pytest, and with a GPU visible a skip fails (tests/conftest.py).

Two criteria:
- elementwise, |got - want| <= atol + rtol |want| with the interpreter tests' tolerances per dtype;
- FlashAttention-2's (kernels/testing.py compare_to_torch): the kernel's max error against float64 is at
  most twice PyTorch's own error computing the same op in the input dtype (SDPA for attention, F.rms_norm,
  F.cross_entropy on the bf16 logits...) plus the reference's rounding to that dtype, capped by the elementwise
  tolerance (a wrong baseline or reference cannot loosen it).
Every configuration of every autotuned kernel is run (pinned with kernels/testing.py pinned_config), not only
the one the autotuner picks; the vocab-parallel cross entropy the model uses is tested at tp = 1 with a
padded vocabulary.
"""
import warnings

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from megagopher import kernels
from megagopher.kernels import dispatch, norms, reference
from megagopher.kernels.testing import (ConfigPruned, assert_ok, compare, compare_to_torch, kernel_autotuners,
                                        pinned_config, stable_seed)
from megagopher.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy

DEVICE = "cuda"
SHRINK = 1  # sequence lengths, rows and vocabularies are divided by this (the CPU dry run's knob; 1 on a GPU)
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (5e-3, 5e-3), torch.bfloat16: (4e-2, 2e-2)}  # also FA2's cap
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# Compiled kernels on a CUDA GPU: skipped only when torch sees no GPU; run in a compiled child pytest when this
# session interprets (tests/conftest.py)
cuda_only = pytest.mark.gpu


def _n(size):
    return max(2, size // SHRINK)


def _rand(seed, *shape, scale=1.0, dtype=F32):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g)).to(dtype).to(DEVICE)


@cuda_only
def test_the_gpu_runs_compiled_kernels():
    """Where a GPU is visible the kernels are compiled for it, not interpreted, and "auto" sends CUDA tensors to
    them: a session where the compiled path cannot be used fails here rather than skipping."""
    assert not dispatch.interpreter_on()
    tuners = kernel_autotuners()
    assert tuners and all(isinstance(t.fn, triton.runtime.JITFunction) for t in tuners.values()), tuners
    assert all(len(t.configs) > 1 for n, t in tuners.items() if n.startswith("grouped_gemm.")), "interpreter configs"
    x, w = _rand(1, 64, 4096, dtype=BF16), _rand(2, 4096, dtype=BF16)
    assert dispatch.resolve(x, "auto", "rms_norm") == ("triton", False)
    torch.testing.assert_close(kernels.rms_norm(x, w), F.rms_norm(x, (4096,), w, 1e-5), atol=4e-2, rtol=2e-2)
    assert x.is_cuda and any(cache[0] for cache in norms._norm_fwd_kernel.device_caches.values())  # compiled


# --- attention: (b, s, h, h_kv, d, causal, dtype, documents, window left); q, k, v always distinct ---
ATTENTION = {
    "causal gqa d128": (2, 1000, 8, 2, 128, True, BF16, None, None),
    "non-causal gqa d128": (2, 777, 8, 2, 128, False, BF16, None, None),
    "causal d64": (1, 1025, 4, 4, 64, True, BF16, None, None),
    "causal mqa d256": (1, 600, 4, 1, 256, True, BF16, None, None),
    "causal d80 (CodeGen)": (2, 500, 4, 4, 80, True, BF16, None, None),
    "fp32 causal gqa d64": (1, 300, 4, 2, 64, True, F32, None, None),
    "fp32 non-causal d128": (1, 200, 2, 2, 128, False, F32, None, None),
    "fp16 causal gqa d128": (2, 700, 8, 2, 128, True, F16, None, None),
    "packed documents d128": (1, None, 8, 2, 128, True, BF16, (1, 100, 517, 64, 300), None),
    "sliding window d64": (1, 1000, 4, 2, 64, True, BF16, None, 128),
    "packed + window d96": (1, None, 4, 2, 96, True, BF16, (300, 1, 250, 449), 100),
}


def _attention_case(name, dtype=None):
    b, s, h, hkv, d, causal, dt, docs, left = ATTENTION[name]
    dt = dtype or dt
    docs = None if docs is None else [_n(n) if n > 1 else n for n in docs]
    s = sum(docs) if docs else _n(s)
    seed = stable_seed(name)
    q, k, v = (_rand(seed + i, b, s, heads, d, dtype=dt) for i, heads in enumerate((h, hkv, hkv)))
    cu = None if docs is None else torch.tensor([0] + docs, device=DEVICE).cumsum(0).to(torch.int32)
    kwargs = dict(causal=causal, cu_seqlens=cu, window_size=None if left is None else (left, 0))
    return (q, k, v), kwargs, _visible(s, docs, causal, left)


def _visible(s, docs, causal, left):
    """Bool (s, s), True where query i sees key j (same document, j <= i, i - left <= j); None where plain
    causal or no masking says it (SDPA then runs its flash kernel rather than a masked one)."""
    if docs is None and left is None:
        return None
    i, j = torch.arange(s, device=DEVICE)[:, None], torch.arange(s, device=DEVICE)[None, :]
    ok = j <= i if causal else torch.ones(s, s, dtype=torch.bool, device=DEVICE)
    if left is not None:
        ok &= j >= i - left
    if docs is not None:
        doc = torch.repeat_interleave(torch.arange(len(docs), device=DEVICE), torch.tensor(docs, device=DEVICE))
        ok &= doc[:, None] == doc[None, :]
    return ok


def _attention_by_mask(q, k, v, visible, causal):
    """The op in PyTorch, in the inputs' dtype: SDPA. In float64 it is the reference: SDPA's math path
    computes softmax(q k^T / sqrt(d)) v in float64, with the visibility mask when there is one."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, is_causal=causal and visible is None,
                                       enable_gqa=q.shape[1] != k.shape[1])
    return o.transpose(1, 2)


def _attention_fns(kwargs, visible):
    ours = lambda q, k, v: kernels.flash_attention(q, k, v, **kwargs, backend="triton")
    torch_op = lambda q, k, v: _attention_by_mask(q, k, v, visible, kwargs["causal"])
    return ours, torch_op


@cuda_only
@pytest.mark.parametrize("name", list(ATTENTION))
def test_attention_meets_fa2_criterion(name):
    args, kwargs, visible = _attention_case(name)
    ours, torch_op = _attention_fns(kwargs, visible)
    crit = compare_to_torch(ours, torch_op, torch_op, args, (0, 1, 2), names="qkv", seed=stable_seed(name),
                            tol=TOL[args[0].dtype])
    assert all(c.ok for c in crit), f"{name}: " + "; ".join(map(str, crit))


@cuda_only
@pytest.mark.parametrize("name", ["causal d80 (CodeGen)", "packed documents d128", "sliding window d64"])
def test_auto_runs_triton_for_any_head_dim_and_packed_input(name):
    """No fallback under "auto" (a fallback warns): d = 80, cu_seqlens and windows take the flash kernel."""
    q, k, v = (t.requires_grad_() for t in _attention_case(name)[0])
    kwargs = _attention_case(name)[1]
    assert dispatch.resolve(q, "auto", "flash_attention") == ("triton", False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="kernels.flash_attention", category=RuntimeWarning)
        kernels.flash_attention(q, k, v, **kwargs).float().sum().backward()


# --- the other ops: name -> (op, builder(dtype, seed) -> (args, kwargs), grad args, op in PyTorch) ---
def _mask(seed, *shape):
    return (torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) < 0.2).to(DEVICE)


def _softmax_torch(x, mask=None, scale=1.0, causal=False):
    masked = mask if mask is not None else torch.ones(x.shape[-2:], dtype=torch.bool, device=x.device).triu(1)
    return torch.softmax((x * scale).masked_fill(masked, float("-inf")), -1)


def _rope_torch(x, cos, sin):  # the reference's formula without its upcast
    half = cos.shape[-1]
    c, s = cos.to(x.dtype)[None, :, None], sin.to(x.dtype)[None, :, None]
    x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, rest], dim=-1)


def _add_norm_torch(norm):
    def op(x, residual, *params, eps=1e-5):
        s = x + residual
        return norm(s, (s.shape[-1],), *params, eps=eps), s
    return op


def _norm_args(seed, dtype, m, n, params):
    x, res = _rand(seed, _n(m), n, dtype=dtype), _rand(seed + 1, _n(m), n, dtype=dtype)
    w, b = _rand(seed + 2, n, scale=0.5, dtype=dtype) + 1, _rand(seed + 3, n, dtype=dtype)
    return (x, res, w, b)[:params]


OPS = {
    "softmax mask": ("scaled_masked_softmax", lambda dt, s: ((_rand(s, 2, 4, _n(300), _n(1000), scale=3.0, dtype=dt),),
                     dict(mask=_mask(s, 2, 1, _n(300), _n(1000)), scale=0.125)), (0,), _softmax_torch),
    "softmax causal long": ("scaled_masked_softmax", lambda dt, s: ((_rand(s, 1, 2, 64, _n(5000), dtype=dt),),
                            dict(causal=True)), (0,), _softmax_torch),
    "rms_norm": ("rms_norm", lambda dt, s: ((_rand(s, _n(4096), 4096, dtype=dt),
                                             _rand(s + 1, 4096, dtype=dt) + 1), {}), (0, 1),
                 lambda x, w, eps=1e-5: F.rms_norm(x, (x.shape[-1],), w, eps)),
    "layer_norm": ("layer_norm", lambda dt, s: ((_rand(s, _n(1000), 5120, dtype=dt), _rand(s + 1, 5120, dtype=dt) + 1,
                                                 _rand(s + 2, 5120, dtype=dt)), {}), (0, 1, 2),
                   lambda x, w, b, eps=1e-5: F.layer_norm(x, (x.shape[-1],), w, b, eps)),
    "add_rms_norm": ("add_rms_norm", lambda dt, s: (_norm_args(s, dt, 4096, 4096, 3), {}), (0, 1, 2),
                     _add_norm_torch(F.rms_norm)),
    "add_layer_norm": ("add_layer_norm", lambda dt, s: (_norm_args(s, dt, 1000, 5120, 4), {}), (0, 1, 2, 3),
                       _add_norm_torch(F.layer_norm)),
    "rope partial": ("apply_rope", lambda dt, s: ((_rand(s, 2, _n(513), 8, 128, dtype=dt),) + _angles(s, _n(513), 32),
                                                  {}), (0,), _rope_torch),
    "swiglu": ("swiglu", lambda dt, s: ((_rand(s, _n(4096), 2753, scale=3.0, dtype=dt),
                                         _rand(s + 1, _n(4096), 2753, dtype=dt)), {}), (0, 1),
               lambda g, u: F.silu(g) * u),
    "cross_entropy": ("cross_entropy", lambda dt, s: ((_rand(s, _n(1000), _n(32000), scale=3.0, dtype=dt),
                                                       _labels(s, _n(1000), _n(32000))), {}), (0,),
                      lambda x, y: F.cross_entropy(x, y, reduction="none")),
}


def _angles(seed, s, half):
    ang = torch.rand(s, half, generator=torch.Generator().manual_seed(seed)).to(DEVICE) * s
    return ang.cos(), ang.sin()


def _labels(seed, m, v):
    return torch.randint(0, v, (m,), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def _op_case(name, dtype):
    op, build, grad_args, torch_op = OPS[name]
    seed = stable_seed(name)
    args, kwargs = build(dtype, seed)
    ours = lambda *a: getattr(kernels, op)(*a, **kwargs, backend="triton")
    ref = getattr(reference, op)
    return op, args, kwargs, grad_args, ours, lambda *a: torch_op(*a, **kwargs), lambda *a: ref(*a, **kwargs)


@cuda_only
@pytest.mark.parametrize("dtype", [BF16, F16])
@pytest.mark.parametrize("name", list(OPS) + [f"attention {a}" for a in ("causal gqa d128", "non-causal gqa d128")])
def test_kernel_on_gpu_matches_reference(name, dtype):
    if name.startswith("attention "):
        args, kwargs, _ = _attention_case(name[len("attention "):], dtype)
        op, grad_args = "flash_attention", (0, 1, 2)
    else:
        op, args, kwargs, grad_args, *_ = _op_case(name, dtype)
    assert dispatch.resolve(args[0], "auto", op) == ("triton", False)
    # "auto" picks Triton here; the check itself runs "triton" so that an Unsupported cannot fall back unseen
    seed = stable_seed(name)
    assert_ok(compare(op, args, kwargs, grad_args, tol=TOL[dtype], backend="triton", seed=seed), f"{name} {dtype}")


@cuda_only
@pytest.mark.parametrize("dtype", [BF16, F16])  # fp32 is attention's case: the criterion is for half precision
@pytest.mark.parametrize("name", list(OPS))
def test_op_meets_fa2_criterion(name, dtype):
    op, args, kwargs, grad_args, ours, torch_op, ref = _op_case(name, dtype)
    crit = compare_to_torch(ours, torch_op, ref, args, grad_args, seed=stable_seed(name), tol=TOL[dtype])
    assert all(c.ok for c in crit), f"{name} {dtype}: " + "; ".join(map(str, crit))


# --- every autotune configuration, not only the autotuner's pick ---
SWEEP = ["causal gqa d128", "non-causal gqa d128", "causal mqa d256", "causal d80 (CodeGen)",
         "fp32 causal gqa d64", "packed documents d128", "sliding window d64"]


def _check_fa2(crit, context):
    assert all(c.ok for c in crit), f"{context}: " + "; ".join(map(str, crit))


def _launched(run):
    """(the autotuned kernels ``run`` launches, by name; its result): Autotuner.run sets best_config."""
    tuners = kernel_autotuners()
    for tuner in tuners.values():
        tuner.best_config = None
    result = run()
    return {n: t for n, t in tuners.items() if getattr(t, "best_config", None) is not None}, result


def _sweep(run, context):
    """``run`` (returning Criterion) once as autotuned, then once per configuration of each autotuned kernel
    it launches, that kernel pinned to it; returns the names of the kernels swept."""
    tuners, crit = _launched(run)
    _check_fa2(crit, f"{context}, autotuned")
    for tname, tuner in tuners.items():
        ran = 0
        for config in tuner.configs:
            with pinned_config(tuner, config) as pin:
                try:
                    crit = run()
                except ConfigPruned:  # the autotuner's own pruning excludes it for this input
                    continue
            assert pin.used, f"{context}: {tname} was not launched with {config} pinned"
            _check_fa2(crit, f"{context}, {tname} pinned to {config}")
            ran += 1
        assert ran, f"{context}: the autotuner prunes every config of {tname}"
    return set(tuners)


def _attention_run(name):
    args, kwargs, visible = _attention_case(name)
    ours, torch_op = _attention_fns(kwargs, visible)
    return lambda: compare_to_torch(ours, torch_op, torch_op, args, (0, 1, 2), names="qkv", seed=stable_seed(name),
                                    tol=TOL[args[0].dtype])


def _op_run(name):
    op, args, kwargs, grad_args, ours, torch_op, ref = _op_case(name, BF16)
    return lambda: compare_to_torch(ours, torch_op, ref, args, grad_args, seed=stable_seed(name), tol=TOL[BF16])


@cuda_only
@pytest.mark.parametrize("name", SWEEP)
def test_attention_every_autotune_config(name):
    swept = _sweep(_attention_run(name), name)
    assert len(swept) >= 3, f"{name}: forward, dK/dV and dQ kernels should all be autotuned; swept {swept}"


@cuda_only
@pytest.mark.parametrize("name", list(OPS))
def test_op_every_autotune_config(name):
    _sweep(_op_run(name), name)


@cuda_only
def test_every_autotuned_kernel_is_swept_by_some_case():
    seen = set()
    for run in [_attention_run(n) for n in SWEEP] + [_op_run(n) for n in OPS]:
        seen |= set(_launched(run)[0])
    assert set(kernel_autotuners()) <= seen, f"never launched by a sweep case: {set(kernel_autotuners()) - seen}"


# --- the cross entropy the model runs: vocab-parallel at tp = 1, padded vocabulary, in-place gradient ---
def _ce_torch(vocab, label_smoothing, z_loss):
    """F.cross_entropy over the real columns in the logits' dtype (float64 for the reference), with PaLM's
    z-loss as vocab_parallel_cross_entropy applies it: in the gradient (2 z lse softmax), not in the value."""
    def op(x, y):
        real = x[:, :vocab]
        loss = F.cross_entropy(real, y, reduction="none", label_smoothing=label_smoothing)
        z = (z_loss * torch.logsumexp(real, -1).square()).masked_fill(y == -100, 0)
        return loss + (z - z.detach()).to(loss.dtype)
    return op


@cuda_only
@pytest.mark.parametrize("label_smoothing,z_loss", [(0.0, 0.0), (0.1, 0.01)])
def test_vocab_parallel_cross_entropy_with_padded_vocab(label_smoothing, z_loss):
    vocab, m = _n(32000) + 7, _n(1000)
    padded = -(-vocab // 128) * 128
    seed = stable_seed("vocab parallel", label_smoothing)
    logits = _rand(seed, m, padded, scale=3.0, dtype=BF16)
    logits[:, vocab:] = 30.0  # padding columns would dominate every row's softmax if they were counted
    labels = _labels(seed, m, vocab)
    labels[::17] = -100
    assert dispatch.resolve(logits, None, "cross_entropy")[0] == "triton"  # the fused path, as in the model
    # as the model calls it: logits are an intermediate (here a clone) that the gradient overwrites
    ours = lambda x, y: vocab_parallel_cross_entropy(x.clone(), y, vocab, label_smoothing, z_loss=z_loss,
                                                     inplace_backward=True)
    torch_op = _ce_torch(vocab, label_smoothing, z_loss)
    # the model's upstream gradient, its mean over the tokens; a random one per token would also measure the
    # second rounding of the in-place scheme (the gradient is stored in bf16 in the forward, scaled after)
    mean = lambda outs: [torch.full_like(outs[0], 1.0 / outs[0].numel())]
    _check_fa2(compare_to_torch(ours, torch_op, torch_op, (logits, labels), (0,), names=("logits",), seed=seed,
                                upstream=mean, tol=TOL[BF16]), f"vocab-parallel cross entropy, label smoothing {label_smoothing}, z-loss {z_loss}")
    x = logits.clone().requires_grad_()
    loss = ours(x, labels)
    loss.sum().backward()
    assert x.grad[:, vocab:].eq(0).all() and x.grad[::17].eq(0).all() and loss[::17].eq(0).all()


# --- the pinning helper itself, on a toy kernel (interpreted on CPU, compiled on a GPU) ---
def _block_fill_prune(configs, named_args, **kwargs):
    return [c for c in configs if c.kwargs["BLOCK"] <= named_args["N"]]


@triton.autotune(configs=[triton.Config({"BLOCK": b}) for b in (16, 32, 64)], key=["N"],
                 prune_configs_by={"early_config_prune": _block_fill_prune})
@triton.jit
def _block_fill(OUT, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(OUT + offs, BLOCK + tl.zeros([BLOCK], dtype=tl.int32), mask=offs < N)


@pytest.mark.skipif(not dispatch.interpreter_on() and not torch.cuda.is_available(),
                    reason="needs the Triton interpreter or a CUDA GPU")
def test_pinned_config_runs_that_config_and_keeps_the_pruner():
    device = "cpu" if dispatch.interpreter_on() else "cuda"
    tuner, cache = _block_fill, _block_fill.cache

    def fill(n):
        out = torch.zeros(n, dtype=torch.int32, device=device)
        _block_fill[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](out, n)
        return out

    for config in tuner.configs:
        with pinned_config(tuner, config) as pin:
            got = fill(100)
        assert pin.used and got.eq(config.kwargs["BLOCK"]).all(), (config, got)
    with pytest.raises(ConfigPruned, match="prunes"), pinned_config(tuner, tuner.configs[2]) as pin:
        fill(40)  # BLOCK 64 > N: the kernel's own pruner drops it, so the autotuner could never pick it
    assert not pin.used
    with pinned_config(tuner, tuner.configs[0]) as pin:
        pass
    assert not pin.used
    with pytest.raises(ValueError, match="not one of"):
        with pinned_config(tuner, triton.Config({"BLOCK": 16})):
            pass
    assert tuner.early_config_prune is _block_fill_prune and tuner.cache is cache
