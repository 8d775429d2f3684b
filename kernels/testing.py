"""Correctness harness shared by the kernel tests and tools/bench_kernels.py: run one kernel through the
public API (forward and backward) with poisoned output buffers, run the PyTorch reference on float64
copies of the same inputs, and report the worst error of the output and of every input gradient.

An element counts as wrong when |got - want| > atol + rtol * |want| (torch.isclose's rule); NaN anywhere,
e.g. an element the kernel never wrote over the NaN poison, is always wrong.

For the GPU tests: ``compare_to_torch`` applies FlashAttention-2's criterion (error against float64 at most
twice PyTorch's own in the input dtype), capped by the elementwise tolerance, and ``pinned_config`` runs an
autotuned kernel with one given configuration, so that every block shape the autotuner may pick is tested, not
only the one it picks.
"""
import contextlib
from dataclasses import dataclass

import torch

from . import reference
from ._common import poison_outputs


@dataclass
class Check:
    name: str          # "out" or "grad <argument>"
    max_abs_err: float
    worst: float       # max over elements of |got - want| / (atol + rtol |want|); <= 1 passes
    nonfinite: int     # elements that are NaN/inf in the kernel's result but not in the reference

    @property
    def ok(self):
        return self.nonfinite == 0 and self.worst <= 1.0

    def __str__(self):
        return f"{self.name}: max abs err {self.max_abs_err:.3g}, worst/allowed {self.worst:.3g}, " \
               f"non-finite {self.nonfinite}"


def measure(name, got, want, atol, rtol):
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != reference {tuple(want.shape)}"
    bad = ~torch.isfinite(got) & torch.isfinite(want)
    diff = (got - want).abs().nan_to_num(float("inf"))
    diff = torch.where(torch.isfinite(want), diff, torch.zeros_like(diff))
    worst = (diff / (atol + rtol * want.abs().nan_to_num(0.0))).max().item() if diff.numel() else 0.0
    return Check(name, diff.max().item() if diff.numel() else 0.0, worst, int(bad.sum()))


def compare(op, args, kwargs=None, grad_args=(), names=None, tol=(1e-5, 1e-5), backend="triton", seed=0):
    """kernels.<op>(*args, **kwargs, backend=backend) against reference.<op> on float64 copies, forward
    and backward (an upstream gradient drawn from ``seed``). ``grad_args``: indices of the arguments to
    differentiate. Returns a list of Check, the output's first (an op returning a tuple: "out", "out 1"...)."""
    import megagopher.kernels as kernels  # the package's public functions (imported here: no cycle)

    kwargs = kwargs or {}
    atol, rtol = tol
    names = names or [f"arg{i}" for i in range(len(args))]
    leaves = [a.detach().clone().requires_grad_(i in grad_args) if torch.is_tensor(a) else a
              for i, a in enumerate(args)]
    with poison_outputs():
        out = getattr(kernels, op)(*leaves, **kwargs, backend=backend)
        outs = out if isinstance(out, tuple) else (out,)  # several outputs: one upstream gradient each
        gen = torch.Generator().manual_seed(seed)
        upstream = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device, o.dtype) for o in outs]
        grads = torch.autograd.grad(outs, [leaves[i] for i in grad_args], upstream) if grad_args else []
    ref_leaves = [a.detach().double().requires_grad_(i in grad_args) if torch.is_tensor(a) and a.is_floating_point()
                  else a for i, a in enumerate(args)]
    ref_out = getattr(reference, op)(*ref_leaves, **kwargs)
    ref_outs = ref_out if isinstance(ref_out, tuple) else (ref_out,)
    ref_grads = (torch.autograd.grad(ref_outs, [ref_leaves[i] for i in grad_args], [u.double() for u in upstream])
                 if grad_args else [])
    checks = [measure("out" if i == 0 else f"out {i}", o, r, atol, rtol)
              for i, (o, r) in enumerate(zip(outs, ref_outs))]
    checks += [measure(f"grad {names[i]}", g, rg, atol, rtol) for i, g, rg in zip(grad_args, grads, ref_grads)]
    return checks


def assert_ok(checks, context=""):
    bad = [c for c in checks if not c.ok]
    assert not bad, f"{context}: " + "; ".join(map(str, bad))


def stable_seed(*parts):
    """A seed derived from a test's parameters, the same in every process (unlike hash() of a str)."""
    import zlib
    return zlib.crc32(repr(parts).encode())


# FlashAttention-2's test criterion (Dao 2023; the flash-attn repository's tests): a kernel is as accurate
# as it should be when its error against a float64 reference is at most ``factor`` (2) times the error of
# PyTorch computing the same op in the input dtype, plus the rounding of the reference to that dtype (the
# epsilon of FlashAttention-3's tests, which keeps the bound above zero where PyTorch happens to be exact). Unlike a fixed tolerance it
# scales with the op and the sizes, so it stays tight for fp32 and for long reductions alike. It is capped by the
# elementwise tolerance (atol + rtol |want|, the interpreter tests' per dtype): the bound grows with PyTorch's
# error, so a wrong baseline, or a wrong reference that kernel and baseline both miss by the same amount, would
# otherwise let any error through.
@dataclass
class Criterion:
    name: str          # "out", "out 1", ... for each output, "grad <argument>"
    err: float         # max |kernel - float64 reference|; inf where the kernel gave a non-finite value
    torch_err: float   # max |PyTorch in the input dtype - float64 reference|
    rounding: float    # max |reference rounded to the output's dtype - reference|
    worst: float       # max over elements of |kernel - reference| / (atol + rtol |reference|): the cap, <= 1
    factor: float = 2.0

    @property
    def bound(self):
        return self.factor * self.torch_err + self.rounding

    @property
    def ok(self):
        return self.err <= self.bound and self.worst <= 1.0

    def __str__(self):
        if self.ok:
            return f"{self.name}: err {self.err:.3g} ok"
        if self.err > self.bound:
            return f"{self.name}: err {self.err:.3g} > {self.factor:g} x torch's {self.torch_err:.3g} + " \
                   f"rounding {self.rounding:.3g}"
        return f"{self.name}: err {self.err:.3g} within FA2's bound {self.bound:.3g} but over the elementwise " \
               f"tolerance (worst/allowed {self.worst:.3g})"


def _max_err(got, want):
    """max |got - want| over the elements where the reference is finite; a NaN/inf in ``got`` there is inf."""
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, f"shape {tuple(got.shape)} != reference {tuple(want.shape)}"
    diff = (got - want).abs().nan_to_num(float("inf"))
    diff = diff[torch.isfinite(want)]
    return diff.max().item() if diff.numel() else 0.0


def _forward_backward(fn, args, grad_args, upstream):
    """Outputs (a tuple) and input gradients of ``fn`` on fresh leaves copied from ``args`` (an op that
    writes into its inputs, as the in-place cross entropy does, cannot disturb the next run)."""
    leaves = [a.detach().clone().requires_grad_(i in grad_args) if torch.is_tensor(a) else a
              for i, a in enumerate(args)]
    outs = fn(*leaves)
    outs = tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)
    ups = upstream(outs)
    grads = torch.autograd.grad(outs, [leaves[i] for i in grad_args], ups) if grad_args else ()
    return outs, grads


def compare_to_torch(ours, baseline, reference_fn, args, grad_args=(), names=None, seed=0, factor=2.0,
                     upstream=None, *, tol):
    """FA2's criterion for ``ours(*args)`` (run with poisoned outputs), ``baseline(*args)`` (PyTorch in the
    input dtype) and ``reference_fn`` on float64 copies of the floating-point args, forward and backward
    with one upstream gradient per output, in the output's dtype and shared by all three: standard normal
    drawn from ``seed``, or ``upstream(outputs)`` (a list), capped by the elementwise tolerance ``tol`` =
    (atol, rtol). Returns a list of Criterion, the outputs' first."""
    atol, rtol = tol
    names = names or [f"arg{i}" for i in range(len(args))]
    drawn = {}

    def draw(outs):
        gen = torch.Generator().manual_seed(seed)
        return [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device, o.dtype) for o in outs]

    def ups(outs, as_double=False):
        if not drawn:
            drawn["ups"] = [u.to(o.dtype) for u, o in zip((upstream or draw)(outs), outs)]
        return [u.double() if as_double else u for u in drawn["ups"]]

    with poison_outputs():
        outs, grads = _forward_backward(ours, args, grad_args, ups)
    base_outs, base_grads = _forward_backward(baseline, args, grad_args, ups)
    ref_args = [a.detach().double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
    ref_outs, ref_grads = _forward_backward(reference_fn, ref_args, grad_args,
                                            lambda o: ups(o, as_double=True))
    out_names = ["out"] if len(outs) == 1 else [f"out {i}" for i in range(len(outs))]
    triples = list(zip(out_names, outs, base_outs, ref_outs))
    triples += [(f"grad {names[i]}", g, bg, rg) for i, g, bg, rg in zip(grad_args, grads, base_grads, ref_grads)]
    return [Criterion(name, _max_err(got, want), _max_err(base, want), _max_err(want.to(got.dtype), want),
                      measure(name, got, want, atol, rtol).worst, factor) for name, got, base, want in triples]


class ConfigPruned(RuntimeError):
    """Raised by a launch under ``pinned_config`` when the autotuner's own early_config_prune would drop the
    pinned configuration for that input: the autotuner could never pick it there, so it is not a failure."""


def kernel_autotuners():
    """{"module.name": triton.runtime.Autotuner} of every autotuned kernel in the kernel package, in the
    configuration list this process compiled them with (the interpreter's single config under
    TRITON_INTERPRET)."""
    import importlib
    import pkgutil
    import triton
    package = importlib.import_module(__package__)
    found = {}
    for info in pkgutil.iter_modules(package.__path__):
        if info.name in ("testing", "apex_ops"):  # not kernels; apex_ops needs apex
            continue
        module = importlib.import_module(f"{__package__}.{info.name}")
        found.update({f"{info.name}.{n}": o for n, o in vars(module).items()
                      if isinstance(o, triton.runtime.Autotuner)})
    return found


@dataclass
class Pin:
    config: object
    used: bool = False  # whether the pinned kernel was launched inside the block


@contextlib.contextmanager
def pinned_config(tuner, config):
    """Every launch of the autotuned kernel ``tuner`` inside the block runs ``config`` (one of
    ``tuner.configs``), so a test can run each block shape rather than only the autotuner's pick.

    triton's Autotuner benchmarks only when more than one config survives pruning, so pinning goes through
    its early_config_prune hook: the installed one runs first, and a launch whose input it would have
    excluded ``config`` from raises ConfigPruned; otherwise ``[config]`` is all that survives and nothing is
    benchmarked. The tuning cache is swapped for an empty one inside the block (a cached pick would bypass
    the hook) and restored after, with the hook. Yields a Pin whose ``used`` says whether the kernel ran."""
    if not any(c is config for c in tuner.configs):
        raise ValueError(f"pinned_config: {config} is not one of the kernel's {len(tuner.configs)} configs")
    prune, cache = tuner.early_config_prune, tuner.cache
    pin = Pin(config)

    def only_pinned(configs, named_args, **kwargs):
        kept = prune(configs, named_args, **kwargs) if prune else configs
        if not any(c is config or c.all_kwargs() == config.all_kwargs() for c in kept):
            raise ConfigPruned(f"{tuner.base_fn.__name__}: the autotuner prunes {config} for this input")
        return [config]

    tuner.early_config_prune, tuner.cache, tuner.best_config = only_pinned, {}, None
    try:
        yield pin
    finally:
        pin.used = getattr(tuner, "best_config", None) is config
        tuner.early_config_prune, tuner.cache = prune, cache
