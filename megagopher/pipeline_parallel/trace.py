"""Recording a pipeline schedule as events, writing them as a Chrome trace, and measuring its bubble.

Each rank records (op, microbatch, chunk, step, start, end) for its F, B and W passes (the schedules open
a span around each pass; waiting for a message happens outside spans, so it counts as idle).
``Tracer.save`` gathers every rank's events to rank 0, which writes one trace-event JSON file (Perfetto,
chrome://tracing) with one row per rank. Times are wall-clock seconds measured with perf_counter's
resolution, so ranks of one machine share a time base. On CUDA a pass is timed with CUDA events on the
current stream (host clocks would time kernel launches, not kernels): each step opens with an anchor
event recorded on an idle device at a known wall time, and every pass's events are placed relative to
it when the trace is saved, so the bubbles a GPU trace shows are the device's.

``bubble_fractions(trace)`` measures, per rank, the idle share of each training step: the step's window
runs from the first pass that any rank starts to the last pass that any rank ends, and a rank's bubble is
1 - (its busy time in the window) / (the window). The result is averaged over the steps asked for.
"""
import contextlib
import json
import os
import time

import torch.distributed as dist


class HostClock:
    """Wall-clock seconds with perf_counter's resolution: marks are times already."""

    def __init__(self):
        self._offset = time.time() - time.perf_counter()

    def now(self):
        return self._offset + time.perf_counter()

    def begin_step(self):
        pass

    def mark(self):
        return self.now()

    def resolve(self, mark):
        return mark


class CudaClock(HostClock):
    """Device time: a mark is a CUDA event recorded on the current stream; ``resolve`` places it at the
    step's anchor (an event recorded on an idle device, at a wall time read right after synchronising)
    plus the device time elapsed between them."""

    def __init__(self, event_factory=None, synchronize=None):
        super().__init__()
        import torch
        self._event = event_factory or (lambda: torch.cuda.Event(enable_timing=True))
        self._synchronize = synchronize or torch.cuda.synchronize
        self._anchor = None

    def begin_step(self):
        self._synchronize()
        event = self._event()
        event.record()
        self._anchor = (event, self.now())

    def mark(self):
        if self._anchor is None:
            self.begin_step()
        event = self._event()
        event.record()
        return self._anchor, event

    def resolve(self, mark):
        (anchor, wall), event = mark
        event.synchronize()
        return wall + anchor.elapsed_time(event) / 1e3  # elapsed_time is in milliseconds


class Tracer:
    def __init__(self, enabled=False, device=None):
        self.enabled = enabled
        self.events = []
        self.step = 0
        on_cuda = enabled and device is not None and getattr(device, "type", device) == "cuda"
        self.clock = CudaClock() if on_cuda else HostClock()

    def begin_step(self):
        """Called by forward_backward: the events that follow belong to the next training step."""
        self.step += 1
        if self.enabled:
            self.clock.begin_step()

    @contextlib.contextmanager
    def span(self, op, microbatch, chunk=0):
        if not self.enabled:
            yield
            return
        start = self.clock.mark()
        try:
            yield
        finally:
            self.events.append({"op": op, "microbatch": microbatch, "chunk": chunk, "step": self.step,
                                "start": start, "end": self.clock.mark()})

    def resolved_events(self):
        """The events with their marks turned into seconds (on CUDA, waits for the events)."""
        return [{**e, "start": self.clock.resolve(e["start"]), "end": self.clock.resolve(e["end"])}
                for e in self.events]

    def save(self, path):
        """Collective: gathers all ranks' events; rank 0 writes ``path`` (temp name, then rename)."""
        if not self.enabled:
            return
        events = self.resolved_events()
        gathered = [events]
        if dist.is_initialized():
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, events)
            if dist.get_rank() != 0:
                return
        write_chrome_trace(gathered, path)


def to_chrome_trace(events_per_rank):
    """Chrome trace-event JSON (a dict) from a list (indexed by rank) of event lists."""
    t0 = min((e["start"] for events in events_per_rank for e in events), default=0.0)
    trace = [{"name": "thread_name", "ph": "M", "pid": 0, "tid": r, "args": {"name": f"rank {r}"}}
             for r in range(len(events_per_rank))]
    for r, events in enumerate(events_per_rank):
        for e in events:
            name = f"{e['op']}{e['microbatch']}" + (f".{e['chunk']}" if e["chunk"] else "")
            trace.append({"name": name, "cat": e["op"], "ph": "X", "pid": 0, "tid": r,
                          "ts": (e["start"] - t0) * 1e6, "dur": (e["end"] - e["start"]) * 1e6,
                          "args": {"op": e["op"], "microbatch": e["microbatch"], "chunk": e["chunk"],
                                   "step": e.get("step", 0)}})
    return {"traceEvents": trace, "displayTimeUnit": "ms"}


def write_chrome_trace(events_per_rank, path):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(to_chrome_trace(events_per_rank), f)
    os.replace(tmp, path)


def load_events(trace):
    """The passes of a Chrome trace (a path or the loaded dict) as dicts with rank, op, microbatch,
    chunk, step, start and end (seconds)."""
    if isinstance(trace, (str, os.PathLike)):
        with open(trace) as f:
            trace = json.load(f)
    events = []
    for e in trace["traceEvents"] if isinstance(trace, dict) else trace:
        if e.get("ph") != "X":
            continue
        args = e.get("args", {})
        events.append({"rank": e["tid"], "op": args.get("op", e.get("cat")), "microbatch": args.get("microbatch"),
                       "chunk": args.get("chunk", 0), "step": args.get("step", 0),
                       "start": e["ts"] / 1e6, "end": (e["ts"] + e["dur"]) / 1e6})
    return events


def bubble_fractions(trace, steps=None):
    """Measured bubble fraction per rank: {rank: mean over ``steps`` (default all) of the idle share of
    the step's window}. ``trace``: a Chrome trace path or dict, or the events of ``load_events``."""
    events = trace if isinstance(trace, list) and trace and "rank" in trace[0] else load_events(trace)
    by_step = {}
    for e in events:
        if steps is None or e["step"] in steps:
            by_step.setdefault(e["step"], []).append(e)
    if not by_step:
        raise ValueError("bubble_fractions: the trace has no passes (was parallel.trace on?)")
    ranks = sorted({e["rank"] for e in events})
    fractions = {r: 0.0 for r in ranks}
    for step_events in by_step.values():
        start = min(e["start"] for e in step_events)
        window = max(e["end"] for e in step_events) - start
        for r in ranks:
            busy = sum(e["end"] - e["start"] for e in step_events if e["rank"] == r)
            fractions[r] += (1.0 - busy / window if window > 0 else 0.0) / len(by_step)
    return fractions
