"""The progress line of a long generation or evaluation: done/total, the rate and the time left, on stderr,
from global rank 0 only, at most every few seconds (a short run prints nothing)."""
import sys
import time

import torch.distributed as dist


def _clock(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """``progress(done)`` with the number finished so far (or ``advance(n)``) prints, when ``every`` seconds
    have passed since the last line, ``label: done/total unit (p%), r unit/s, ETA h:mm:ss``; the last
    update prints a closing line when any line was printed before it or the run took ``every`` seconds."""

    def __init__(self, total, label, unit="examples", every=5.0, stream=None, enabled=None):
        self.total, self.label, self.unit, self.every = int(total), label, unit, float(every)
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = (not dist.is_initialized() or dist.get_rank() == 0) if enabled is None else enabled
        self.start = self.last = time.perf_counter()
        self.done, self.printed = 0, False

    def __call__(self, done):
        self.done = int(done)
        now = time.perf_counter()
        finished = self.done >= self.total
        due = now - self.last >= self.every
        if not self.enabled or not (due or (finished and (self.printed or now - self.start >= self.every))):
            return
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta = "done in " + _clock(elapsed) if finished else "ETA " + (_clock(left) if left != float("inf") else "?")
        percent = 100.0 * self.done / self.total if self.total else 100.0
        print(f"{self.label}: {self.done}/{self.total} {self.unit} ({percent:.0f}%), {rate:.2f} {self.unit}/s, "
              f"{eta}", file=self.stream, flush=True)
        self.last, self.printed = now, True

    def advance(self, n=1):
        self(self.done + n)
