"""Recording a pipeline schedule as events and writing them as a Chrome trace (Perfetto, chrome://tracing).

Each rank records (op, microbatch, chunk, start, end) for its F, B and W passes; ``save`` gathers every
rank's events to rank 0, which writes one trace-event JSON file with one row (tid) per pipeline rank.
"""
import contextlib
import json
import os
import time

import torch.distributed as dist


class Tracer:
    def __init__(self, enabled=False):
        self.enabled = enabled
        self.events = []
        self.t0 = time.perf_counter()

    @contextlib.contextmanager
    def span(self, op, microbatch, chunk=0):
        if not self.enabled:
            yield
            return
        start = time.perf_counter()
        try:
            yield
        finally:
            self.events.append({"op": op, "microbatch": microbatch, "chunk": chunk,
                                "start": start - self.t0, "end": time.perf_counter() - self.t0})

    def save(self, path):
        """Collective: gathers all ranks' events; rank 0 writes ``path`` (temp name, then rename)."""
        if not self.enabled:
            return
        rank = dist.get_rank() if dist.is_initialized() else 0
        gathered = [None] * (dist.get_world_size() if dist.is_initialized() else 1)
        if dist.is_initialized():
            dist.all_gather_object(gathered, self.events)
        else:
            gathered = [self.events]
        if rank != 0:
            return
        trace = [{"name": f"{e['op']}{e['microbatch']}" + (f".{e['chunk']}" if e["chunk"] else ""), "cat": e["op"],
                  "ph": "X", "pid": 0, "tid": r, "ts": e["start"] * 1e6, "dur": (e["end"] - e["start"]) * 1e6,
                  "args": {"microbatch": e["microbatch"], "chunk": e["chunk"]}}
                 for r, events in enumerate(gathered) for e in events]
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"traceEvents": trace, "displayTimeUnit": "ms"}, f)
        os.replace(tmp, path)
