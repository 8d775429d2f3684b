"""Measure the pipeline bubble of every schedule on CPU and print it next to the theoretical one.

Each of pp gloo ranks (one thread each) holds an equal-cost synthetic stage: ``--layers`` square matmuls
of width ``--hidden`` over ``--tokens`` rows, built from megagopher's W-deferrable linear, so a forward,
an input-gradient pass (B) and a weight-gradient pass (W) each cost one matmul per layer, the equal-cost
assumption of the textbook formulas. The schedules run through the trainer's own entry point
(``forward_backward``) with a Tracer; the measured bubble is ``bubble_fractions`` of the trace (the idle
share of each step's window, averaged over ranks and over the steps after the first). The "plan" column
is the schedule's own time-step table with every pass one unit (F = B, and F = B = W for ZB-H1).

Theory (equal-cost stages, m micro-batches, p stages, v virtual stages per rank):
    gpipe, 1f1b    (p-1) / (m + p-1)
    interleaved    (p-1) / (v m + p-1)
    zb-h1          (p-1)(F+B-W) / (m(F+B+W) + (p-1)(F+B-W)), = (p-1) / (3m + p-1) when F = B = W; printed
                   with the pass times measured in the trace.

    python tools/bench_pipeline.py --pp 2,4 --microbatches 8 [--trace-dir runs/bench]
Timings are only meaningful when the machine has a free core per rank (and some to spare for gloo's
communication threads); with more ranks than cores the passes of ranks that compute at the same time
slow each other down and the measured bubble drifts from the plan.
"""
import argparse
import os
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megagopher import parallel_state as ps  # noqa: E402
from megagopher.common import SCHEDULES  # noqa: E402
from megagopher.pipeline_parallel.plan import build_plan, theoretical_bubble  # noqa: E402
from megagopher.pipeline_parallel.schedules import forward_backward  # noqa: E402
from megagopher.pipeline_parallel.trace import Tracer, bubble_fractions, write_chrome_trace  # noqa: E402
from megagopher.tensor_parallel.weight_grad import linear  # noqa: E402


class SyntheticStage(nn.Module):
    """``layers`` matmuls of width ``hidden`` (with a cheap tanh between): equal cost on every stage. The
    first stage makes its input from the token ids (a cheap gather); the last returns a per-token loss."""

    def __init__(self, layers, hidden, pre_process, post_process, seed):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.weights = nn.ParameterList([nn.Parameter(torch.randn(hidden, hidden, generator=gen) / hidden ** 0.5)
                                         for _ in range(layers)])
        self.pre_process, self.post_process, self.hidden = pre_process, post_process, hidden
        self.table = torch.randn(64, hidden, generator=gen) if pre_process else None

    def forward(self, input_ids=None, labels=None, hidden_states=None):
        x = self.table[input_ids.t() % 64] if self.pre_process else hidden_states  # [s, b, h]
        for w in self.weights:
            x = torch.tanh(linear(x, w))
        if self.post_process:
            return x.float().pow(2).mean(-1).t()  # per-token "loss" [b, s]
        return x


def _bench_rank(rank, world, args):
    results = []
    for schedule in args.schedules:
        vpp = args.vpp if schedule == "interleaved" else 1
        ps.initialize_model_parallel(pp=world, vpp=vpp)
        chunks = [SyntheticStage(args.layers // vpp, args.hidden, c == 0 and rank == 0,
                                 c == vpp - 1 and rank == world - 1, seed=100 * c + rank) for c in range(vpp)]
        seq, batch = args.tokens // args.micro_batch, args.micro_batch
        data = [{"tokens": torch.randint(0, 64, (batch, seq)), "labels": torch.zeros(batch, seq, dtype=torch.long)}
                for _ in range(args.microbatches)]
        tracer = Tracer(enabled=True)
        for step in range(args.steps):
            if step == 1:  # the first step warms up (connections, allocator) and is not measured
                start = time.perf_counter()
            forward_backward(chunks, data, lambda loss: loss.sum(), schedule=schedule, tracer=tracer,
                             tensor_shape=(seq, batch, args.hidden))
            torch.distributed.barrier()  # steps apart, as an optimizer step would keep them
        elapsed = (time.perf_counter() - start) / (args.steps - 1)
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, tracer.resolved_events())
        results.append((schedule, vpp, gathered, elapsed))
        ps.destroy_model_parallel()
    return results if rank == 0 else None


def _mean_time(events_per_rank, op, steps):
    times = [e["end"] - e["start"] for events in events_per_rank for e in events if e["op"] == op and e["step"] in steps]
    return sum(times) / len(times) if times else 0.0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--pp", default="2,4", help="pipeline sizes, comma-separated (default 2,4)")
    parser.add_argument("--schedules", default=",".join(SCHEDULES), help="comma-separated (default: all)")
    parser.add_argument("--microbatches", type=int, default=8, help="micro-batches per step, m (default 8)")
    parser.add_argument("--vpp", type=int, default=2, help="virtual stages per rank for interleaved (default 2)")
    parser.add_argument("--layers", type=int, default=4, help="matmuls per stage (default 4)")
    parser.add_argument("--hidden", type=int, default=384, help="matmul width (default 384)")
    parser.add_argument("--tokens", type=int, default=512, help="rows per micro-batch, s * b (default 512)")
    parser.add_argument("--micro-batch", type=int, default=1, help="b of a micro-batch (default 1)")
    parser.add_argument("--steps", type=int, default=4, help="steps per schedule; the first is not measured")
    parser.add_argument("--trace-dir", default="", help="write one Chrome trace per pp and schedule here")
    args = parser.parse_args(argv)
    args.schedules = [s for s in args.schedules.split(",") if s]
    for s in args.schedules:
        if s not in SCHEDULES:
            parser.error(f"--schedules: {s!r}; valid: {', '.join(SCHEDULES)}")
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step is not measured)")
    if args.layers % args.vpp:
        parser.error(f"--layers {args.layers} must be divisible by --vpp {args.vpp}")
    from megagopher.testing import spawn

    print(f"equal-cost stages: {args.layers} x matmul [{args.tokens} x {args.hidden}] x [{args.hidden} x "
          f"{args.hidden}] per pass; m = {args.microbatches}; {os.cpu_count()} CPU cores; load average "
          f"{os.getloadavg()[0]:.1f}")
    print("| schedule | pp | vpp | m | measured bubble (mean over ranks) | plan, unit-time passes | theoretical "
          "| step time (s) |")
    print("|---|---|---|---|---|---|---|---|")
    measured_steps = set(range(2, args.steps + 1))
    for pp in [int(x) for x in args.pp.split(",")]:
        for schedule, vpp, events, elapsed in spawn(_bench_rank, pp, args, timeout_s=600)[0]:
            fractions = bubble_fractions([dict(e, rank=r) for r, evs in enumerate(events) for e in evs],
                                         steps=measured_steps)
            measured = sum(fractions.values()) / len(fractions)
            m = args.microbatches
            theory = f"{theoretical_bubble(schedule, pp, vpp, m):.3f}"
            if schedule == "zb-h1":
                t_f, t_b, t_w = (_mean_time(events, op, measured_steps) for op in "FBW")
                theory = (f"{theoretical_bubble(schedule, pp, vpp, m):.3f} (F=B=W); "
                          f"{theoretical_bubble(schedule, pp, vpp, m, t_f, t_b, t_w):.3f} with measured "
                          f"F/B/W = {t_f * 1e3:.1f}/{t_b * 1e3:.1f}/{t_w * 1e3:.1f} ms")
            orders, table = build_plan(schedule, pp, vpp, m)
            planned = 1 - len(orders[0]) / len(table[0])
            print(f"| {schedule} | {pp} | {vpp} | {m} | {measured:.3f} | {planned:.3f} | {theory} | {elapsed:.3f} |",
                  flush=True)
            if args.trace_dir:
                os.makedirs(args.trace_dir, exist_ok=True)
                write_chrome_trace(events, os.path.join(args.trace_dir, f"pp{pp}_{schedule}.json"))


if __name__ == "__main__":
    main()
