"""Pipeline plans, stages, the weight-gradient split, traces and the pipeline tools, in one process.

The plans are pure Python, so every schedule is checked here over many (pp, vpp, m) combinations: every
pass appears once, dependencies are respected, the orders never deadlock, the schedules' memory
bookkeeping meets its bound, and with unit-cost passes the time-step table has exactly the textbook
bubble. The multi-process equivalence with the serial model is in test_pipeline.py.
"""
import json
import os
import subprocess
import sys
import zlib

import pytest
import torch
import torch.nn.functional as F

from megagopher.pipeline_parallel import plan
from megagopher.pipeline_parallel.plan import ScheduleError, validate_schedule
from megagopher.pipeline_parallel.stages import stage_layer_ranges
from megagopher.pipeline_parallel.trace import Tracer, bubble_fractions, load_events, to_chrome_trace
from megagopher.tensor_parallel.weight_grad import linear, store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEDULE_VPP = [("gpipe", 1), ("gpipe", 2), ("1f1b", 1), ("zb-h1", 1), ("interleaved", 1), ("interleaved", 2),
                ("interleaved", 3), ("interleaved", 4)]


def _combinations(max_pp=8):
    for schedule, vpp in SCHEDULE_VPP:
        for pp in range(2, max_pp + 1):
            for m in range(1, 3 * pp + 2):
                if schedule == "interleaved" and vpp > 1 and m < pp:
                    continue
                yield schedule, pp, vpp, m


@pytest.mark.parametrize("kwargs, message", [
    (dict(schedule="pipedream", pp=2), "parallel.schedule = 'pipedream'; valid: 'gpipe', '1f1b'"),
    (dict(schedule="1f1b", pp=0), "parallel.pp = 0 must be a positive integer"),
    (dict(schedule="1f1b", pp=2, num_microbatches=0), "number of micro-batches = 0"),
    (dict(schedule="1f1b", pp=1, vpp=2), "parallel.vpp = 2 needs parallel.pp > 1"),
    (dict(schedule="1f1b", pp=2, vpp=2), "parallel.schedule = '1f1b' runs one model chunk per rank"),
    (dict(schedule="zb-h1", pp=4, vpp=2), "parallel.schedule = 'zb-h1' runs one model chunk per rank"),
    (dict(schedule="interleaved", pp=4, vpp=2, num_microbatches=3),
     "parallel.schedule = 'interleaved' with parallel.pp = 4, parallel.vpp = 2 needs at least parallel.pp = 4 "
     "micro-batches per step, got 3"),
])
def test_validate_schedule_names_keys_and_values(kwargs, message):
    args = dict(vpp=1, num_microbatches=4)
    args.update(kwargs)
    with pytest.raises(ValueError) as info:
        validate_schedule(args.pop("schedule"), args.pop("pp"), **args)
    assert message in str(info.value)
    assert isinstance(info.value, ScheduleError)


def test_valid_combinations_are_accepted():
    for schedule, pp, vpp, m in [("gpipe", 1, 1, 1), ("zb-h1", 1, 1, 3), ("interleaved", 4, 2, 4),
                                 ("interleaved", 4, 2, 9), ("interleaved", 2, 1, 1), ("gpipe", 4, 2, 1)]:
        validate_schedule(schedule, pp, vpp, m)


def test_every_plan_is_complete_ordered_and_deadlock_free():
    count = 0
    for schedule, pp, vpp, m in _combinations():
        orders, table = plan.build_plan(schedule, pp, vpp, m)
        passes = "FBW" if schedule == "zb-h1" else "FB"
        where = f"{schedule} pp={pp} vpp={vpp} m={m}"
        step_of = {}
        for rank, order in enumerate(orders):
            expected = {(k, mb, c) for k in passes for mb in range(m) for c in range(vpp)}
            assert len(order) == len(expected) and set(order) == expected, where
            assert [op for op in table[rank] if op is not None] == order, where  # the table keeps the order
            for step, op in enumerate(table[rank]):
                if op is not None:
                    step_of[(op[0], op[1], op[2] * pp + rank)] = step
        last = pp * vpp - 1
        for (kind, mb, v), step in step_of.items():  # each pass after the passes it needs
            need = {"F": ("F", mb, v - 1) if v > 0 else None,
                    "B": ("B", mb, v + 1) if v < last else ("F", mb, v), "W": ("B", mb, v)}[kind]
            assert need is None or step_of[need] < step, (where, kind, mb, v)
        count += 1
    assert count > 300


def test_memory_bookkeeping_of_the_plans():
    for schedule, pp, vpp, m in _combinations():
        orders, _ = plan.build_plan(schedule, pp, vpp, m)
        for stage, order in enumerate(orders):
            peak = plan.memory_bookkeeping(order)
            if schedule == "gpipe":
                assert peak["activations"] == m * vpp
            elif schedule in ("1f1b", "zb-h1") or vpp == 1:
                assert peak["activations"] == min(pp - stage, m), (schedule, pp, m, stage, peak)
            if schedule == "zb-h1":
                assert peak["total"] <= pp, (pp, m, stage, peak)
            else:
                assert peak["deferred_w"] == 0


def _published_bubble(schedule, p, v, m):
    """The bubble fraction as the papers give it, from p, v and m alone (never the module's formula), for
    equal passes (ZB-H1: F = B = W; the others: any F and B). GPipe (Huang et al. 2019) and 1F1B (Narayanan
    et al. 2021, PipeDream-Flush) idle p-1 passes per rank beside m: (p-1)/(m+p-1); interleaving with v chunks
    per rank divides the bubble by v (Narayanan et al. 2021, section 2.2): (p-1)/(v m+p-1); ZB-H1 (Qi et al.
    2023, "Zero Bubble Pipeline Parallelism", section 3.1) idles (p-1)(F+B-W) = (p-1)F beside m(F+B+W) = 3mF:
    (p-1)/(3m+p-1)."""
    if schedule == "zb-h1":
        return (p - 1) / (3 * m + p - 1)
    if schedule == "interleaved":
        return (p - 1) / (v * m + p - 1)
    return (p - 1) / (m + p - 1)


@pytest.mark.parametrize("schedule, vpp", [("gpipe", 1), ("1f1b", 1), ("zb-h1", 1), ("interleaved", 2),
                                           ("interleaved", 3)])
def test_unit_cost_tables_have_the_textbook_bubble(schedule, vpp):
    """With every pass one time step (F = B, and F = B = W for ZB-H1), the table's idle share is exactly
    (p-1)/(m+p-1), (p-1)/(v m+p-1) interleaved (any m >= p, multiple of p or not), (p-1)/(3m+p-1) ZB-H1;
    plan.theoretical_bubble says the same."""
    for pp in (2, 3, 4, 8):
        for m in range(pp, 3 * pp + 2):
            orders, table = plan.build_plan(schedule, pp, vpp, m)
            measured = 1 - len(orders[0]) / len(table[0])
            expected = _published_bubble(schedule, pp, vpp, m)
            assert measured == pytest.approx(expected, abs=1e-12), (pp, m)
            assert plan.theoretical_bubble(schedule, pp, vpp, m, t_f=1, t_b=1, t_w=1 if schedule == "zb-h1"
                                           else None) == pytest.approx(expected, abs=1e-12), (pp, m)


def _idle_time(events):
    """Per rank, the time in the step's window that the rank spends in no pass."""
    start, end = min(e["start"] for evs in events for e in evs), max(e["end"] for evs in events for e in evs)
    return [end - start - sum(e["end"] - e["start"] for e in evs) for evs in events]


def test_zb_h1_bubble_is_a_third_of_1f1b_with_equal_passes():
    """Zero Bubble (Qi et al. 2023, section 3.1): with T_F = T_B = T_W, ZB-H1 idles (p-1) T_F per rank where
    1F1B idles (p-1)(T_F + T_B + T_W) = 3 (p-1) T_F: a third. Measured on the simulated plans (1F1B's whole
    backward is B + W = 2 T_F), against the number worked out here."""
    for pp, m in ((4, 8), (8, 16), (3, 5)):
        zb = _idle_time(plan.simulated_events("zb-h1", pp, 1, m, t_f=1.0, t_b=1.0, t_w=1.0))
        one_f_one_b = _idle_time(plan.simulated_events("1f1b", pp, 1, m, t_f=1.0, t_b=2.0))
        assert zb == pytest.approx([pp - 1.0] * pp, abs=1e-9), (pp, m)
        assert one_f_one_b == pytest.approx([3.0 * (pp - 1)] * pp, abs=1e-9), (pp, m)


def test_stage_layer_ranges():
    assert stage_layer_ranges(8, 4) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert stage_layer_ranges(8, 2, 2) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert stage_layer_ranges(6, 2, pp_layers=[1, 5]) == [(0, 1), (1, 6)]
    # Per pipeline rank with vpp = 2: rank 0 holds 4 layers (2 per chunk), rank 1 holds 2 (1 per chunk);
    # virtual stages in pipeline order are rank 0 chunk 0, rank 1 chunk 0, rank 0 chunk 1, rank 1 chunk 1.
    assert stage_layer_ranges(6, 2, 2, pp_layers=[4, 2]) == [(0, 2), (2, 3), (3, 5), (5, 6)]
    assert stage_layer_ranges(5, 2, 2, pp_layers=[2, 1, 1, 1]) == [(0, 2), (2, 3), (3, 4), (4, 5)]
    for args, message in [((6, 4), "model.num_layers = 6 is not divisible by parallel.pp * parallel.vpp = 4 * 1"),
                          ((6, 2, 1, [1, 2]), "parallel.pp_layers = [1, 2] sums to 3, but model.num_layers = 6"),
                          ((6, 2, 1, [6]), "has 1 entries"),
                          ((6, 2, 2, [3, 3]), "each must be divisible by parallel.vpp = 2"),
                          ((6, 2, 1, [-1, 7]), "must be non-negative integers")]:
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]").replace("*", r"\*")):
            stage_layer_ranges(*args)


def test_weight_gradient_is_really_deferred():
    """Inside the zb-h1 capture, B computes the input and bias gradients only; W computes the weight
    gradient later (through accumulate_main_grad when the data-parallel wrapper provides it)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 8, generator=gen, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(6, 8, generator=gen))
    bias = torch.nn.Parameter(torch.randn(6, generator=gen))
    upstream = torch.randn(5, 3, 6, generator=gen)
    ref_x, ref_w, ref_b = (t.detach().clone().requires_grad_() for t in (x, weight, bias))
    F.linear(ref_x, ref_w, ref_b).backward(upstream)

    assert linear(x, weight, bias).grad_fn.name() == F.linear(x, weight, bias).grad_fn.name()  # plain outside
    store.clear()
    with store.capture():
        y = linear(x, weight, bias)
        with store.defer():
            y.backward(upstream)
        store.flush(("mb", 0))
    assert weight.grad is None, "B computed the weight gradient: the split is not real"
    torch.testing.assert_close(x.grad, ref_x.grad)
    torch.testing.assert_close(bias.grad, ref_b.grad)
    assert store.pending() == 1
    received = []
    weight.accumulate_main_grad = received.append
    store.run(("mb", 0))
    assert store.pending() == 0 and weight.grad is None and len(received) == 1
    torch.testing.assert_close(received[0], ref_w.grad)
    del weight.accumulate_main_grad
    # Without the wrapper the W pass accumulates into .grad; outside defer() B computes it at once.
    with store.capture():
        y = linear(x, weight, bias)
        with store.defer():
            y.backward(upstream)
        store.flush(("mb", 1))
        store.run(("mb", 1))
        torch.testing.assert_close(weight.grad, ref_w.grad)
        linear(x, weight, bias).backward(upstream)
    torch.testing.assert_close(weight.grad, 2 * ref_w.grad)


def _synthetic_events():
    """Two ranks, one step of 10 time units: rank 0 busy 0-4 and 6-10 (bubble 0.2), rank 1 busy 2-7."""
    return [[{"op": "F", "microbatch": 0, "chunk": 0, "step": 1, "start": 100.0, "end": 104.0},
             {"op": "B", "microbatch": 0, "chunk": 0, "step": 1, "start": 106.0, "end": 110.0}],
            [{"op": "F", "microbatch": 0, "chunk": 0, "step": 1, "start": 102.0, "end": 107.0}]]


def test_chrome_trace_and_bubble_fraction(tmp_path):
    trace = to_chrome_trace(_synthetic_events())
    assert {e["tid"] for e in trace["traceEvents"]} == {0, 1}
    fractions = bubble_fractions(trace)
    assert fractions[0] == pytest.approx(0.2) and fractions[1] == pytest.approx(0.5)
    path = tmp_path / "trace.json"
    path.write_text(json.dumps(trace))
    assert bubble_fractions(str(path)) == pytest.approx(fractions)
    assert len(load_events(str(path))) == 3

    tracer = Tracer(enabled=True)
    tracer.begin_step()
    with tracer.span("F", 3, 1):
        pass
    tracer.save(str(tmp_path / "one.json"))  # one process, no process group: writes directly
    (event,) = load_events(str(tmp_path / "one.json"))
    assert (event["op"], event["microbatch"], event["chunk"], event["step"]) == ("F", 3, 1, 1)
    disabled = Tracer(enabled=False)
    with disabled.span("F", 0):
        pass
    assert disabled.events == []


def test_cuda_clock_places_device_events_at_the_step_anchor():
    """On CUDA a span is timed by events on the stream: its seconds are the anchor's wall time plus the
    device time elapsed since the anchor, whatever the host was doing meanwhile (fake events here)."""
    from megagopher.pipeline_parallel.trace import CudaClock
    device_ms = iter([0.0, 5.0, 12.5, 100.0, 101.0, 104.0])  # each record() takes the device's next time

    class FakeEvent:
        def record(self):
            self.t = next(device_ms)

        def synchronize(self):
            pass

        def elapsed_time(self, other):
            return other.t - self.t

    clock = CudaClock(event_factory=FakeEvent, synchronize=lambda: None)
    clock.begin_step()
    wall = clock._anchor[1]
    start, end = clock.mark(), clock.mark()
    assert clock.resolve(start) == pytest.approx(wall + 0.005) and clock.resolve(end) == pytest.approx(wall + 0.0125)
    clock.begin_step()  # a new step, a new anchor: device time 100 ms is its zero
    wall = clock._anchor[1]
    start, end = clock.mark(), clock.mark()
    # Wall times near 1.7e9 s carry about 2e-7 s of float64 rounding, hence abs=1e-6 on differences.
    assert clock.resolve(end) - clock.resolve(start) == pytest.approx(0.003, abs=1e-6)
    assert clock.resolve(start) == pytest.approx(wall + 0.001)


def _png_size(path):
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert zlib.crc32(data[12:29]) == int.from_bytes(data[29:33], "big")  # the IHDR chunk's CRC
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_plot_and_bench_tools(tmp_path):
    for tool in ("plot_pipeline.py", "bench_pipeline.py"):
        out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", tool), "--help"], capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0 and "usage" in out.stdout, out.stderr
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps(to_chrome_trace(_synthetic_events())))
    for suffix in ("png", "svg"):
        picture = tmp_path / f"timeline.{suffix}"
        out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "plot_pipeline.py"), str(trace), "-o",
                              str(picture)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "bubble" in out.stdout
    width, height = _png_size(tmp_path / "timeline.png")
    assert width > 100 and height > 40
    assert (tmp_path / "timeline.svg").read_text().startswith("<svg")
    # The plans of the schedules on one time axis, with each plan's bubble (here the textbook one).
    plans = tmp_path / "plans.png"
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "plot_pipeline.py"), "--plan",
                          "1f1b,zb-h1", "--pp", "4", "--microbatches", "8", "-o", str(plans)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "1f1b: pp 4, m 8, bubble 0.273" in out.stdout and "zb-h1: pp 4, m 8, bubble 0.111" in out.stdout
    assert _png_size(plans)[1] > height


def test_simulated_plans_have_the_textbook_bubble_with_unequal_passes():
    """The plan simulated with B = 2F (1F1B family) or B = W = F (ZB-H1) idles exactly the theory."""
    for schedule, vpp in (("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("zb-h1", 1)):
        for pp, m in ((2, 4), (4, 8), (4, 9), (8, 16)):
            events = plan.simulated_events(schedule, pp, vpp, m)
            fractions = bubble_fractions([dict(e, rank=r) for r, evs in enumerate(events) for e in evs])
            assert len(fractions) == pp
            for fraction in fractions.values():
                assert fraction == pytest.approx(_published_bubble(schedule, pp, vpp, m)), (schedule, pp, m)
                assert fraction == pytest.approx(plan.theoretical_bubble(schedule, pp, vpp, m)), (schedule, pp, m)


def test_plans_are_built_and_validated_once_per_shape():
    """A training step asks for its plan every step; it is validated and built once per (schedule, pp, vpp,
    micro-batches) and then shared."""
    plan.build_plan.cache_clear()
    first = plan.build_plan("interleaved", 4, 2, 6)
    assert plan.build_plan("interleaved", 4, 2, 6) is first
    assert plan.build_plan("interleaved", 4, 2, 7) is not first
    assert plan.build_plan.cache_info().misses == 2 and plan.build_plan.cache_info().hits == 1
    assert plan.forward_only_plan(2, 1, 3) is plan.forward_only_plan(2, 1, 3)
