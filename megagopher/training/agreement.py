"""Agreement between ranks: the decisions every rank must take together, each carried by one all-reduce.

Invariant 6 (docs/ARCHITECTURE.md): a rank never decides alone to stop, skip a step or publish a checkpoint
while the others go on into the next collective, or the job hangs. So every such decision is a vote summed
over all ranks, and every rank reads the same verdict from the same sum:

  - ``agree(ok)``: True only if ``ok`` on every rank (a save started, a checkpoint is usable, a metrics
    file could be opened, no stop signal arrived during start-up);
  - ``agree_on_step(vote)``: the one all-reduce of a training (or evaluation) step, carrying the loss and
    z-loss sums from their owners (Megatron's loss all-reduce, extended), the stop request, "my
    asynchronous checkpoint write is done" and one non-finite flag per rank (so the verdict names them).

``StepVote`` packs itself into the float64 vector the all-reduce carries and ``StepVerdict`` unpacks the
sum, by field name: the slots live here, beside the collective, and nowhere else.
"""
import dataclasses
import math

import torch
import torch.distributed as dist

from megagopher import parallel_state as ps


def agree(ok, device=None):
    """True only if ``ok`` on every rank (one all-reduce)."""
    flag = torch.tensor([0 if ok else 1], dtype=torch.int64, device=device or ps.get_device())
    dist.all_reduce(flag)
    return int(flag.item()) == 0


@dataclasses.dataclass
class StepVote:
    """What one rank puts into the step's all-reduce. ``loss_sum`` and ``z_loss_sum``: this rank's share of
    the global batch's sums (0 on ranks that do not own a loss: only the last pipeline stage's TP rank 0
    of each data-parallel and context-parallel rank does)."""
    loss_sum: float = 0.0
    z_loss_sum: float = 0.0
    stop_requested: bool = False
    write_done: bool = True

    # The summed scalars, in their slots; slot len(SCALARS) + r is rank r's "my loss is not finite".
    SCALARS = ("loss_sum", "z_loss_sum", "stop_requested", "write_done")

    def pack(self, rank, world):
        values = torch.zeros(len(self.SCALARS) + world, dtype=torch.float64)
        finite = math.isfinite(self.loss_sum)
        for slot, name in enumerate(self.SCALARS):
            values[slot] = float(getattr(self, name))
        values[0] = self.loss_sum if finite else 0.0  # a NaN would poison every rank's sum
        values[len(self.SCALARS) + rank] = 0.0 if finite else 1.0
        return values


@dataclasses.dataclass
class StepVerdict:
    """The step's all-reduce, read back: the global sums (``loss_sum`` NaN when any rank's was not
    finite), whether any rank asked to stop, whether every rank's checkpoint write is done, and which ranks
    saw a non-finite loss."""
    loss_sum: float
    z_loss_sum: float
    stop_requested: bool
    every_write_done: bool
    non_finite_ranks: list

    @classmethod
    def unpack(cls, values, world):
        sums = dict(zip(StepVote.SCALARS, values[:len(StepVote.SCALARS)].tolist()))
        bad = [r for r, flag in enumerate(values[len(StepVote.SCALARS):].tolist()) if flag > 0]
        return cls(loss_sum=float("nan") if bad else sums["loss_sum"], z_loss_sum=sums["z_loss_sum"],
                   stop_requested=sums["stop_requested"] > 0, every_write_done=int(sums["write_done"]) == world,
                   non_finite_ranks=bad)


def agree_on_step(vote, device):
    """Sums every rank's ``vote`` (a StepVote) in one all-reduce; the same StepVerdict on every rank."""
    world = dist.get_world_size()
    values = vote.pack(dist.get_rank(), world).to(device)
    dist.all_reduce(values)
    return StepVerdict.unpack(values.cpu(), world)
