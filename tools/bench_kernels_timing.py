"""The GPU half of tools/bench_kernels.py: time the Triton kernel and each baseline of every case (forward,
backward, both) with triton.testing.do_bench, in priority order until the time budget is spent, and turn
the times into rows with TFLOP/s (attention, FlashAttention-2's count: backward = 2.5 x forward) or GB/s
(the memory-bound ops), each as a fraction of the card's ceiling: the peak dense bf16 rate
(megagopher.training.metrics.peak_tflops) or the bandwidth of a large device-to-device copy measured at
start, which is what a memory-bound kernel can reach (the issue's target is 85% of it).
"""
import time

import torch

DIRECTIONS = ("fwd", "bwd", "fwd+bwd")
FLOPS_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
WARMUP_MS, REP_MS = 10, 50  # do_bench's budget per measurement (its defaults are 25 and 100)


def time_ms(fn, grad_to_none=None):
    """Median milliseconds of ``fn`` (L2 flushed between runs). The one GPU timer here: the CPU dry run
    of this module swaps it for a wall clock."""
    from triton.testing import do_bench
    return do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, grad_to_none=grad_to_none, return_mode="median")


def copy_bandwidth(device="cuda", nbytes=1 << 31):
    """(GB/s, ms, nbytes) of copying ``nbytes`` (read + write) from one device buffer to another."""
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    ms = time_ms(lambda: y.copy_(x))
    return 2 * nbytes / ms / 1e6, ms, nbytes


def _outputs(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def time_impl(fn, inputs, grad_args):
    """({direction: ms}, note) of ``fn(*inputs)``. The first call and backward compile and autotune; a
    backward that can run only once per graph (the cross entropy scales its saved gradient in place) is
    timed as fwd+bwd minus fwd, which the note says."""
    leaves = [t.detach().requires_grad_(i in grad_args) if torch.is_tensor(t) else t for i, t in enumerate(inputs)]
    params = [leaves[i] for i in grad_args]
    outs = _outputs(fn(*leaves))
    dys = [torch.randn_like(o) for o in outs]
    torch.autograd.backward(outs, dys)
    times = {"fwd": time_ms(lambda: fn(*leaves)),
             "fwd+bwd": time_ms(lambda: torch.autograd.backward(_outputs(fn(*leaves)), dys), grad_to_none=params)}
    outs = _outputs(fn(*leaves))
    try:
        times["bwd"] = time_ms(lambda: torch.autograd.backward(outs, dys, retain_graph=True), grad_to_none=params)
        return times, ""
    except RuntimeError:
        times["bwd"] = max(times["fwd+bwd"] - times["fwd"], 0.0)
        return times, "bwd = (fwd+bwd) - fwd: one backward per graph"


def _ours(case):
    from megagopher import kernels
    if case.ours is not None:
        return case.ours
    return lambda *a: getattr(kernels, case.op)(*a, **case.kwargs, backend="triton")


def work_units(cases):
    """(priority, case index, implementation name, fn), in the order they are timed."""
    units = []
    for i, case in enumerate(cases):
        units.append((case.priority, i, 0, "triton", _ours(case)))
        units += [(case.priority + offset, i, j + 1, name, fn) for j, (name, fn, offset) in enumerate(case.baselines)]
    return [(p, i, name, fn) for p, i, _, name, fn in sorted(units, key=lambda u: u[:3])]


def run_units(cases, budget_s=None, on_result=None):
    """Times every unit until ``budget_s`` seconds have gone (the unit under way finishes). Returns
    ({(case index, name): (times or None, note)}, units skipped). A baseline that refuses an input (SDPA's
    backends do, by shape or dtype) gets its error as the note; so does the Triton kernel, as a failure."""
    results, skipped, start = {}, 0, time.time()
    for _, i, name, fn in work_units(cases):
        if budget_s is not None and time.time() - start > budget_s:
            skipped += 1
            continue
        try:
            results[(i, name)] = time_impl(fn, cases[i].args, cases[i].grad_args)
        except Exception as e:  # reported in the table; the Triton kernel's own failure fails the run
            msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
            results[(i, name)] = (None, f"{type(e).__name__}: {msg}")
        if on_result is not None:
            on_result(results)
    return results, skipped


def _rate(case, direction, ms):
    """(column, value): TFLOP/s or GB/s of one direction."""
    if case.work[0] == "flops":
        return "TFLOP/s", case.work[1] * FLOPS_FACTOR[direction] / ms / 1e9
    byt = {"fwd": case.work[1], "bwd": case.work[2], "fwd+bwd": case.work[1] + case.work[2]}[direction]
    return "GB/s", byt / ms / 1e6


def rows(cases, results, dtype, peak_tflops, copy_gbps):
    """One row per (case, implementation, direction), with the fraction of the ceiling (peak TFLOP/s for
    attention in bf16/fp16, the measured copy bandwidth otherwise) and, for a baseline, how many times
    faster the Triton kernel is (``triton_speedup`` > 1: ours is faster)."""
    out = []
    for i, case in enumerate(cases):
        ours = results.get((i, "triton"), (None, ""))[0]
        for name in ["triton"] + [b[0] for b in case.baselines]:
            if (i, name) not in results:
                continue
            times, note = results[(i, name)]
            base = dict(kernel=case.kernel, shape=case.label, dtype=dtype, impl=name)
            if times is None:
                out.append(dict(base, direction="-", note=note, result="FAIL" if name == "triton" else "n/a"))
                continue
            for direction in DIRECTIONS:
                ms = times[direction]
                unit, rate = _rate(case, direction, ms)
                ceiling = copy_gbps if unit == "GB/s" else (peak_tflops if dtype in ("bf16", "fp16") else None)
                row = dict(base, direction=direction, ms=round(ms, 4), **{unit: round(rate, 1)},
                           of_peak=round(rate / ceiling, 3) if ceiling else None)
                if name != "triton" and ours is not None:
                    row["triton_speedup"] = round(ms / ours[direction], 3)
                if note:
                    row["note"] = note
                out.append(row)
    return out


def display(row):
    """The row as the console table shows it: fractions as percentages, absent values blank."""
    shown = {k: ("" if v is None else v) for k, v in row.items()}
    if row.get("of_peak") is not None:
        shown["of_peak"] = f"{100 * row['of_peak']:.0f}%"
    if row.get("triton_speedup") is not None:
        shown["triton_speedup"] = f"{row['triton_speedup']:.2f}x"
    return shown
