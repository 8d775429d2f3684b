"""tools/check_kernels.py in CI: every Triton kernel of the package (each op: attention forward and backward,
softmax, the norms and the residual-fused norms, RoPE, SwiGLU, cross entropy, the grouped GEMM) compiles for
sm_90a and sm_100a without spills and within shared memory, no GPU needed. The test runs the tool's --quick
sweep, each kernel's largest tile once per arch (34 compilations, about 30 CPU-seconds cold); the full sweep
(every config, both dtypes, head dims 64 to 256) is the tool's default, run by hand (BENCHMARKS.md). A spill fails
the sweep for a wrapper's fixed launch too, and the fixed launches the tool compiles are the ones the wrappers
make (recorded from the delta kernel's and the softmax's wrappers)."""
import importlib.util
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "check_kernels.py")
ARCHS = ("sm_90a", "sm_100a")
# The kernels that multiply tiles: Hopper's warpgroup MMA on sm_90a, Blackwell's tcgen05 on sm_100a.
MATMUL = {"_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel", "_grouped_fwd_kernel", "_grouped_dw_kernel"}
MMA = {"sm_90a": "wgmma", "sm_100a": "tcgen05"}


def _tool():
    spec = importlib.util.spec_from_file_location("check_kernels", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _kernels_in_source():
    """Every @triton.jit function named *_kernel in kernels/*.py, read from the source: a list kept apart from
    the tool's own discovery, so a kernel the tool misses is caught here."""
    found = set()
    folder = os.path.join(ROOT, "kernels")
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            with open(os.path.join(folder, name)) as f:
                found |= set(re.findall(r"@triton\.jit\s*\ndef (\w+_kernel)\(", f.read()))
    return found


def _env():
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real compilation, not interpreted


def test_every_kernel_compiles_clean_for_sm90_and_sm100():
    out = subprocess.run([sys.executable, TOOL, "--quick"], env=_env(), capture_output=True, text=True,
                         timeout=900, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    rows = [l.split() for l in out.stdout.splitlines() if re.search(r" regs=\d+ ", l)]
    kernels = _kernels_in_source()
    assert len(kernels) >= 17 and MATMUL <= kernels, kernels
    compiled = sorted((r[0], r[1]) for r in rows)
    assert compiled == sorted((k, a) for k in kernels for a in ARCHS), compiled  # each kernel once per arch
    for r in rows:
        line = " ".join(r)
        assert r[-1] == "ok" and "spills=0" in r, line
        if r[0] in MATMUL:  # on the tensor cores, at the arch's own instruction
            assert f"mma={MMA[r[1]]}" in r, line
        if r[0] in ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"):  # operands through TMA descriptors
            assert "HEAD_DIM=128" in r and "TMA=True" in r and "CAUSAL=True" in r, line
    # the largest tiles: the forward's 128 x 32 attention tile, the grouped GEMM's 128 x 128, the widest norm row
    picked = {r[0]: set(r) for r in rows}
    assert {"BLOCK_M=128", "BLOCK_N=32"} <= picked["_fwd_kernel"], picked["_fwd_kernel"]
    assert {"BLOCK_M=128", "BLOCK_N=128"} <= picked["_grouped_fwd_kernel"] & picked["_grouped_dw_kernel"]
    assert "BLOCK_N=16384" in picked["_norm_fwd_kernel"], picked["_norm_fwd_kernel"]
    assert re.search(rf"check_kernels: {2 * len(kernels)} compilations \(sm_100a, sm_90a\), 0 fail",
                     out.stdout), out.stdout[-2000:]


def test_a_kernel_without_a_spec_fails_the_sweep(monkeypatch, capsys):
    tool = _tool()
    found = [("softmax", "_softmax_fwd_kernel"), ("new_op", "_new_kernel")]  # a kernel added without a spec
    monkeypatch.setattr(tool, "package_kernels", lambda: found)
    assert tool.main(["--quick"]) == 1
    assert "no spec for kernel(s) new_op._new_kernel" in capsys.readouterr().out


def test_spills_and_shared_memory_overflows_fail():
    """A spill fails the sweep whether the autotuner may pick the config or a wrapper always launches it."""
    tool = _tool()
    clean = dict(regs=200, spills=0, smem=98304, mma="wgmma")
    assert tool.verdict(clean) == "ok"
    assert tool.verdict(dict(clean, spills=16)).startswith("FAIL spills 16")
    assert tool.verdict(dict(clean, smem=tool.SMEM_LIMIT + 1)).startswith("FAIL shared memory")
    assert tool.verdict(dict(clean, error="CompilationError: x")).startswith("FAIL compile")


class _Launched(Exception):
    """Raised by a recorded launch: the wrapper's choice is known, the kernel need not run."""


def _record(launches):
    # Stands in for a Triton kernel: kernel[grid](*args, **constexprs_and_warps) records the keywords.
    def launch(*args, **kwargs):
        launches.append(kwargs)
        raise _Launched

    return type("Recorder", (), {"__getitem__": lambda self, grid: launch})()


def test_fixed_launches_are_compiled_as_the_wrappers_pick_them(monkeypatch):
    """The delta kernel's and the softmax's launches, recorded from the wrappers at the shapes the tool sweeps
    (head dims 64 to 256; rows of 4096 and 8192 keys with the GPU's blocks), are among the tool's compilations:
    the tool checks what a GPU runs, not a copy of the wrappers' rules that could drift."""
    import torch
    from megagopher.kernels import attention, attention_bwd, softmax
    head_dims = (64, 80, 128, 256)
    compiled = {name: sets for _, name, _, _, sets in _tool().specs(head_dims)}
    launches = []
    monkeypatch.setattr(attention_bwd, "_bwd_delta_kernel", _record(launches))
    for d in head_dims:
        q = torch.randn(1, 8, 2, d, dtype=torch.float16)
        try:
            attention.flash_attention_backward(q, q, q, q, torch.zeros(1, 2, 8), q)
        except _Launched:
            pass
    assert len(launches) == len(head_dims) and all(l in compiled["_bwd_delta_kernel"] for l in launches), launches
    assert {l["HEAD_DIM"]: l["BLOCK_M"] for l in launches} == {64: 128, 128: 64, 256: 16}, launches
    launches.clear()
    monkeypatch.setattr(softmax, "interpreter_on", lambda: False)  # the blocks a GPU takes
    monkeypatch.setattr(softmax, "_softmax_fwd_kernel", _record(launches))
    monkeypatch.setattr(softmax, "_softmax_bwd_kernel", _record(launches))
    for sk in (4096, 8192):
        x = torch.randn(1, 1, 1, sk, dtype=torch.float16)
        for call in (lambda: softmax.scaled_masked_softmax(x, causal=True),
                     lambda: softmax.scaled_masked_softmax(x, mask=torch.zeros(sk, dtype=torch.bool)),
                     lambda: softmax.ScaledMaskedSoftmaxFunction.backward(
                         type("Ctx", (), {"saved_tensors": (x,), "scale": 1.0})(), x)):
            try:
                call()
            except _Launched:
                pass
    fwd = [l for l in launches if "CAUSAL" in l]
    assert len(fwd) == 4 and all(l in compiled["_softmax_fwd_kernel"] for l in fwd), fwd
    bwd = [l for l in launches if "CAUSAL" not in l]
    assert len(bwd) == 2 and all(l in compiled["_softmax_bwd_kernel"] for l in bwd), bwd
    assert {(l["SINGLE_BLOCK"], l["num_warps"]) for l in fwd} == {(True, 8), (False, 16)}, fwd
