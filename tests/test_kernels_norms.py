"""RMSNorm and LayerNorm Triton kernels, forward and backward (input, weight and bias gradients, the latter
reduced from per-program partial sums), under the interpreter on CPU, against the float64 reference:
row counts that do not divide among the programs, widths that are not powers of two, fp32 / fp16 / bf16
inputs, fp32 weights with low-precision inputs, LayerNorm without weight or bias. Outputs and gradients
are allocated poisoned (NaN).

Tolerances (atol, rtol) per dtype of the input, |got - want| <= atol + rtol |want| elementwise against
float64; weight gradients are sums over all rows, rounded once to the parameter dtype.

Rows wider than one backward block take the split backward (row reductions first, then column blocks); it
is tested at 5000 columns and, with a small block, at 200. Last, the wrappers' GPU launches cross-compile
for sm_90a without spills (a subprocess, without the interpreter).
"""
import os
import subprocess
import sys

import pytest
import torch

from megagopher.kernels import norms
from megagopher.kernels.testing import assert_ok, compare, stable_seed

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (5e-3, 5e-3), torch.bfloat16: (4e-2, 2e-2)}
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

# (x shape, x dtype, parameter dtype)
SHAPES = [
    ((3, 17, 96), F32, F32),
    ((3, 17, 96), F16, F16),
    ((2, 9, 200), BF16, BF16),
    ((5, 130), BF16, F32),    # mixed: bf16 activations, fp32 parameters
    ((1, 1, 1000), F32, F32),  # one row
    ((129, 8), F16, F32),
    ((7, 5000), F32, F32),    # wide rows: one row per program
]


def _inputs(shape, dtype, pdtype, seed, with_bias=True):
    g = torch.Generator().manual_seed(seed)
    x = (2 * torch.randn(shape, generator=g) + 0.5).to(dtype)
    w = (1 + 0.5 * torch.randn(shape[-1], generator=g)).to(pdtype)
    b = (0.5 * torch.randn(shape[-1], generator=g)).to(pdtype) if with_bias else None
    return x, w, b


@pytest.mark.parametrize("shape,dtype,pdtype", SHAPES)
def test_rms_norm_matches_reference(shape, dtype, pdtype):
    seed = stable_seed(("rms", shape))
    x, w, _ = _inputs(shape, dtype, pdtype, seed, with_bias=False)
    checks = compare("rms_norm", (x, w), dict(eps=1e-5), grad_args=(0, 1), names=("x", "weight"),
                     tol=TOL[dtype], seed=seed)
    assert_ok(checks, f"rms_norm {shape} {dtype} weight {pdtype}")


@pytest.mark.parametrize("shape,dtype,pdtype", SHAPES)
def test_layer_norm_matches_reference(shape, dtype, pdtype):
    seed = stable_seed(("ln", shape))
    x, w, b = _inputs(shape, dtype, pdtype, seed)
    checks = compare("layer_norm", (x, w, b), dict(eps=1e-5), grad_args=(0, 1, 2), names=("x", "weight", "bias"),
                     tol=TOL[dtype], seed=seed)
    assert_ok(checks, f"layer_norm {shape} {dtype} params {pdtype}")


@pytest.mark.parametrize("with_weight,with_bias", [(False, False), (True, False)])
def test_layer_norm_without_affine_parameters(with_weight, with_bias):
    x, w, b = _inputs((4, 33, 48), F32, F32, seed=3)
    w = w if with_weight else None
    b = b if with_bias else None
    grad_args = (0,) + ((1,) if with_weight else ())
    checks = compare("layer_norm", (x, w, b), dict(eps=1e-6), grad_args=grad_args, names=("x", "weight", "bias"),
                     tol=TOL[F32], seed=3)
    assert_ok(checks, f"layer_norm weight={with_weight} bias={with_bias}")


@pytest.mark.parametrize("op", ["rms_norm", "layer_norm"])
def test_split_backward_over_many_column_blocks(op, monkeypatch):
    # rows wider than one backward block: c1, c2 reduced first, then dx, dw, db per column block (4, ragged)
    monkeypatch.setattr(norms, "SINGLE_PASS_COLUMNS", 64)
    x, w, b = _inputs((33, 200), F16, F32, seed=11)
    args, names = ((x, w), ("x", "weight")) if op == "rms_norm" else ((x, w, b), ("x", "weight", "bias"))
    checks = compare(op, args, dict(eps=1e-5), grad_args=tuple(range(len(args))), names=names, tol=TOL[F16],
                     seed=11)
    assert_ok(checks, f"{op} split backward")


_CHECK = """
import importlib.util
spec = importlib.util.spec_from_file_location("check_kernels", "tools/check_kernels.py")
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)
for job in tool.jobs(only={"norms"}, arch=[90], dtype=["bf16"]):  # every launch of the norm wrappers
    if job[0] == "norms":
        row = tool.compile_one(job)
        print(row["kernel"], row["config"].replace(" ", ","), row["spills"], tool.verdict(row))
"""


def test_norm_launches_compile_without_spills_for_sm90():
    """Every launch the norm wrappers make for widths 4096, 8192 and 16384 (plain and fused with the residual
    add, forward and backward), cross-compiled for sm_90a: no spills."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real compilation
    out = subprocess.run([sys.executable, "-c", _CHECK], env=env, cwd=root, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split() for line in out.stdout.splitlines()]
    assert rows and all(r[2] == "0" and r[3] == "ok" for r in rows), out.stdout
    compiled = [(r[0], set(r[1].split(","))) for r in rows]

    def has(kernel, *settings):
        return any(k == kernel and set(settings) <= c for k, c in compiled)
    for rms in ("True", "False"):  # the widest fused forward, and both backward forms of the fused one
        assert has("_norm_fwd_kernel", f"IS_RMS={rms}", "HAS_RESIDUAL=True", "BLOCK_N=16384"), out.stdout
        assert has("_norm_bwd_kernel", f"IS_RMS={rms}", "HAS_DS=True", "SPLIT=True"), out.stdout
        assert has("_norm_bwd_kernel", f"IS_RMS={rms}", "HAS_DS=True", "SPLIT=False", "BLOCK_N=4096"), out.stdout
        assert has("_norm_bwd_rows_kernel", f"IS_RMS={rms}"), out.stdout
