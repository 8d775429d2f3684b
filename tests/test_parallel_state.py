"""parallel_state: the layout's groups are released when the layout is, so a process that changes layout
(a staged run, a suite on long-lived ranks) does not gather communicators. A gloo group holds a device
thread and worker threads; before destroy_model_parallel destroyed its groups, one tp2 x pp2 layout left
27 threads per rank behind, and the pipeline tests' ranks grew to 900 threads each."""
import os

import torch
import torch.distributed as dist

from megagopher import parallel_state as ps
from megagopher.testing import spawn


def _threads():
    return len(os.listdir("/proc/self/task"))


def _release_and_reuse(rank, world):
    registered = lambda: len(dist.distributed_c10d._world.pg_map)  # noqa: E731
    before = (registered(), _threads())
    seen = []
    for tp, pp in ((2, 2), (4, 1), (1, 4)):
        ps.initialize_model_parallel(tp=tp, pp=pp)
        during = registered()
        total = torch.tensor([float(rank)])
        dist.all_reduce(total, group=ps.get_tp_group())  # the new layout's groups work
        expected = sum(ps.get_tp_ranks())
        ps.destroy_model_parallel()
        seen.append({"during": during, "after": (registered(), _threads()), "tp_sum": (total.item(), expected)})
    return {"before": before, "layouts": seen}


def test_destroy_model_parallel_releases_the_layouts_groups():
    for rank, r in enumerate(spawn(_release_and_reuse, 4)):
        for layout in r["layouts"]:
            assert layout["during"] > r["before"][0], (rank, layout)  # the layout did create groups
            assert layout["after"] == r["before"], (rank, r)  # ... and none of them, nor a thread, is left
            assert layout["tp_sum"][0] == layout["tp_sum"][1], (rank, layout)
