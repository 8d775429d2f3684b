"""tools/bench_kernels.py: --help answers at once (no torch/triton import); without a GPU (or with
--interpreter-check) it re-runs itself under the Triton interpreter and prints, and writes as JSON, the
correctness table. The GPU timing harness's logic runs here with a stand-in timer: rates and fractions of
the ceiling, speedups, priority order and the time budget, failing baselines as notes, a backward that
runs once per graph, the attention grid and SDPA with its backend pinned."""
import json
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "tools", "bench_kernels.py")


def test_help_is_quick():
    out = subprocess.run([sys.executable, BENCH, "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "--kernel" in out.stdout and "--json" in out.stdout


def test_interpreter_check_reexecs_and_writes_the_table(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # it must set it itself
    table = tmp_path / "table.json"
    out = subprocess.run([sys.executable, BENCH, "--kernel", "swiglu", "--dtype", "fp32", "--json", str(table),
                          "--interpreter-check"], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Re-running under the Triton interpreter" in out.stdout and "0 failed" in out.stdout
    assert ("No CUDA GPU" in out.stdout) != torch.cuda.is_available()
    rows = json.loads(table.read_text())
    assert {r["check"] for r in rows} == {"fwd out", "bwd gate", "bwd up"}
    assert all(r["result"] == "pass" and r["kernel"] == "swiglu" for r in rows)


# --- the GPU harness's logic, on CPU with a stand-in timer (tools/bench_kernels_timing.py, _cases.py) ---
sys.path.insert(0, os.path.join(ROOT, "tools"))
import bench_kernels_cases as cases  # noqa: E402
import bench_kernels_timing as timing  # noqa: E402


def _case(priority=0, baselines=(), work=("bytes", 4e6, 8e6), ours=None):
    x = torch.randn(4, 8)
    return cases.Case("swiglu", "4x8", "swiglu", (x, x + 1), {}, (0, 1), list(baselines), work, priority,
                      ours or (lambda a, b: a * b))


def test_rows_give_rates_fractions_of_the_ceiling_and_speedups():
    results = {(0, "triton"): ({"fwd": 1.0, "bwd": 2.0, "fwd+bwd": 4.0}, ""),
               (0, "torch"): ({"fwd": 2.0, "bwd": 3.0, "fwd+bwd": 4.0}, ""), (0, "liger"): (None, "ImportError: x"),
               (1, "triton"): (None, "CompilationError: y")}
    mem = _case(baselines=[("torch", None, 0), ("liger", None, 0)])
    attn = _case(work=("flops", 2e12))
    rows = timing.rows([mem, attn], results, "bf16", peak_tflops=1000.0, copy_gbps=10.0)
    by = {(r["impl"], r["direction"], r["kernel"] if r is not rows[-1] else "attn"): r for r in rows}
    fwd = by[("triton", "fwd", "swiglu")]
    assert fwd["GB/s"] == 4.0 and fwd["of_peak"] == 0.4  # 4 MB in 1 ms, of a 10 GB/s copy
    assert by[("triton", "fwd+bwd", "swiglu")]["GB/s"] == 3.0  # 12 MB in 4 ms
    assert by[("torch", "fwd", "swiglu")]["triton_speedup"] == 2.0
    assert by[("torch", "fwd+bwd", "swiglu")]["triton_speedup"] == 1.0
    assert by[("liger", "-", "swiglu")]["result"] == "n/a" and rows[-1]["result"] == "FAIL"
    flops = timing.rows([attn], {(0, "triton"): ({"fwd": 2.0, "bwd": 5.0, "fwd+bwd": 7.0}, "")}, "bf16", 1000.0, 10.0)
    assert [r["TFLOP/s"] for r in flops] == [1000.0, 1000.0, 1000.0]  # FA2's count: bwd = 2.5 x fwd
    assert [r["of_peak"] for r in flops] == [1.0, 1.0, 1.0]
    fp32 = timing.rows([attn], {(0, "triton"): ({"fwd": 2.0, "bwd": 5.0, "fwd+bwd": 7.0}, "")}, "fp32", 1000.0, 10.0)
    assert all(r["of_peak"] is None for r in fp32)  # the peak table is bf16's tensor-core rate
    assert timing.display(fwd)["of_peak"] == "40%"


def test_run_units_orders_by_priority_keeps_the_budget_and_notes_failures(monkeypatch):
    calls = []
    monkeypatch.setattr(timing, "time_ms", lambda fn, grad_to_none=None: (fn(), 1.0)[1])
    clock = iter(range(0, 1000, 10))  # every look at the clock is 10 s later
    monkeypatch.setattr(timing.time, "time", lambda: next(clock))

    def tagged(tag):
        return lambda a, b: (calls.append(tag), a * b)[1]

    def broken(a, b):
        raise RuntimeError("No available kernel")
    low = _case(priority=2, ours=tagged("low triton"))
    high = _case(priority=0, ours=tagged("high triton"),
                 baselines=[("torch.compile", tagged("high compile"), 1), ("sdpa[cudnn]", broken, 0)])
    order = [(i, name) for _, i, name, _ in timing.work_units([low, high])]
    assert order == [(1, "triton"), (1, "sdpa[cudnn]"), (1, "torch.compile"), (0, "triton")]
    results, skipped = timing.run_units([low, high], budget_s=35)  # clock read at 0, then 10, 20, 30, 40
    assert skipped == 1 and (0, "triton") not in results  # the one due after the budget was spent
    assert results[(1, "sdpa[cudnn]")] == (None, "RuntimeError: No available kernel")
    assert results[(1, "triton")][0] == {"fwd": 1.0, "bwd": 1.0, "fwd+bwd": 1.0}
    assert calls[0] == "high triton" and "high compile" in calls and "low triton" not in calls


class _OneBackward(torch.autograd.Function):
    """Like the cross entropy that scales its saved gradient in place: a second backward is refused."""
    @staticmethod
    def forward(ctx, x):
        ctx.done = False
        return x * 2

    @staticmethod
    def backward(ctx, dy):
        if ctx.done:
            raise RuntimeError("one backward per graph")
        ctx.done = True
        return dy * 2


def test_time_impl_derives_a_backward_that_runs_once_per_graph(monkeypatch):
    ms = iter([3.0, 5.0])  # a timer repeats what it times: here twice
    monkeypatch.setattr(timing, "time_ms", lambda fn, grad_to_none=None: (fn(), fn(), next(ms))[2])
    times, note = timing.time_impl(lambda x: _OneBackward.apply(x), (torch.randn(3),), (0,))
    assert times == {"fwd": 3.0, "fwd+bwd": 5.0, "bwd": 2.0} and "fwd+bwd" in note


def test_attention_grid_and_sdpa_baselines_with_pinned_backends():
    shapes = cases._attention_shapes(small=False)
    grid = [s for s in shapes if s[2] == s[3]]
    assert {d for *_, d, _, _ in grid} == {64, 128, 256} and {s for _, s, *_ in grid} == {1024, 4096, 16384}
    assert all(b * s == 16384 and h * d == 2048 for b, s, h, _, d, _, _ in grid)
    assert any(h != hkv for _, _, h, hkv, *_ in shapes) and any(not causal for *_, causal, _ in shapes)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 33, h, 16, generator=g) for h in (4, 2, 2))
    from megagopher.kernels import reference
    names = [name for name, _, _ in cases.sdpa_baselines(True)]
    assert names == ["sdpa[flash]", "sdpa[cudnn]", "sdpa[efficient]"]
    flash = cases.sdpa_baselines(True)[0][1]  # torch has a CPU flash kernel; GQA through enable_gqa
    assert torch.allclose(flash(q, k, v), reference.flash_attention(q, k, v, causal=True), atol=1e-5)
