"""training/agreement.py on 3 gloo ranks: the step's vote is one all-reduce whose named fields come back as
every rank's same verdict (the loss and z-loss sums of their owners, any stop request, every rank's
checkpoint write done, and exactly which ranks saw a non-finite loss); ``agree`` is True only when every
rank says so. The expected verdicts are written out from the votes by hand."""
import math

import torch
import torch.distributed as dist

from megagopher.testing import spawn
from megagopher.training.agreement import StepVote, agree, agree_on_step

CPU = torch.device("cpu")


def _votes(rank, world):
    real_all_reduce, calls = dist.all_reduce, []

    def counting(*args, **kwargs):
        calls.append(1)
        return real_all_reduce(*args, **kwargs)

    dist.all_reduce = counting
    try:
        finite = agree_on_step(StepVote(loss_sum=[1.5, 0.0, 2.25][rank], z_loss_sum=[0.5, 0.0, 0.25][rank],
                                        stop_requested=rank == 2, write_done=True), CPU)
        one_call = len(calls)
        bad = agree_on_step(StepVote(loss_sum=float("nan") if rank == 1 else 1.0,
                                     write_done=rank != 0), CPU)
        inf = agree_on_step(StepVote(loss_sum=float("inf") if rank in (0, 2) else 0.0), CPU)
    finally:
        dist.all_reduce = real_all_reduce
    return {"finite": finite, "bad": bad, "inf": inf, "one_call": one_call,
            "all": agree(True, CPU), "one_says_no": agree(rank != 1, CPU)}


def test_the_step_verdict_is_the_votes_summed_by_name():
    results = spawn(_votes, 3)
    for r in results:
        assert r["one_call"] == 1  # one collective carries every field
        v = r["finite"]
        assert (v.loss_sum, v.z_loss_sum, v.stop_requested, v.every_write_done, v.non_finite_ranks) == \
            (3.75, 0.75, True, True, [])
        v = r["bad"]
        assert math.isnan(v.loss_sum) and v.non_finite_ranks == [1]
        assert not v.stop_requested and not v.every_write_done
        assert r["inf"].non_finite_ranks == [0, 2] and math.isnan(r["inf"].loss_sum)
        assert r["all"] is True and r["one_says_no"] is False
