"""Correctness harness shared by the kernel tests and tools/bench_kernels.py: run one kernel through the
public API (forward and backward) with poisoned output buffers, run the PyTorch reference on float64
copies of the same inputs, and report the worst error of the output and of every input gradient.

An element counts as wrong when |got - want| > atol + rtol * |want| (torch.isclose's rule); NaN anywhere,
e.g. an element the kernel never wrote over the NaN poison, is always wrong.
"""
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
    differentiate. Returns a list of Check, the output's first."""
    import megagopher.kernels as kernels  # the package's public functions (imported here: no cycle)

    kwargs = kwargs or {}
    atol, rtol = tol
    names = names or [f"arg{i}" for i in range(len(args))]
    leaves = [a.detach().clone().requires_grad_(i in grad_args) if torch.is_tensor(a) else a
              for i, a in enumerate(args)]
    with poison_outputs():
        out = getattr(kernels, op)(*leaves, **kwargs, backend=backend)
        gen = torch.Generator().manual_seed(seed)
        upstream = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device, out.dtype)
        grads = torch.autograd.grad(out, [leaves[i] for i in grad_args], upstream) if grad_args else []
    ref_leaves = [a.detach().double().requires_grad_(i in grad_args) if torch.is_tensor(a) and a.is_floating_point()
                  else a for i, a in enumerate(args)]
    ref_out = getattr(reference, op)(*ref_leaves, **kwargs)
    ref_grads = (torch.autograd.grad(ref_out, [ref_leaves[i] for i in grad_args], upstream.double())
                 if grad_args else [])
    checks = [measure("out", out, ref_out, atol, rtol)]
    checks += [measure(f"grad {names[i]}", g, rg, atol, rtol) for i, g, rg in zip(grad_args, grads, ref_grads)]
    return checks


def assert_ok(checks, context=""):
    bad = [c for c in checks if not c.ok]
    assert not bad, f"{context}: " + "; ".join(map(str, bad))


def stable_seed(*parts):
    """A seed derived from a test's parameters, the same in every process (unlike hash() of a str)."""
    import zlib
    return zlib.crc32(repr(parts).encode())
