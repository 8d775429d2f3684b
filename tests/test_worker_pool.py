"""The worker pool behind megagopher.testing.spawn: ranks are reused, and each task starts as a fresh rank."""
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from megagopher import worker_pool
from megagopher.testing import spawn
from train_utils import wait_gone


def _leave_state_behind(rank, world_size):
    import faulthandler
    from megagopher import parallel_state as ps
    faulthandler.dump_traceback_later(4, exit=True)  # a test's hang timer: it must die with the task
    ps.initialize_model_parallel(tp=2, pp=1)
    extra = dist.new_group([0, 1])
    dist.all_reduce(torch.ones(1), group=extra)
    os.environ["MG_POOL_LEAK"] = "1"
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(rank + 99)
    return os.getpid()


def _fresh_state(rank, world_size, wait_s=0.0):
    import time
    from megagopher import parallel_state as ps
    time.sleep(wait_s)  # past the hang timer a previous task may have set
    groups = len(dist.distributed_c10d._world.pg_map)
    with pytest.raises(RuntimeError, match="has not been called"):
        ps.get_tp_group()
    total = torch.full((1,), float(rank))
    dist.all_reduce(total)
    return dict(pid=os.getpid(), groups=groups, leak=os.environ.get("MG_POOL_LEAK"),
                dtype=torch.get_default_dtype(), draw=torch.rand(3), total=total.item(),
                env_rank=os.environ["RANK"])


def _fail_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError("deliberate failure on rank 1")
    return rank


def test_pool_reuses_ranks_and_resets_them():
    pids = spawn(_leave_state_behind, 2)
    after = spawn(_fresh_state, 2, 5.0)  # 5 s: past _leave_state_behind's 4 s hang timer
    assert [a["pid"] for a in after] == pids, "the second task should run on the same processes"
    for rank, a in enumerate(after):
        assert a["groups"] == 1, "only the default group may survive a task"
        assert a["leak"] is None and a["env_rank"] == str(rank)
        assert a["dtype"] == torch.float32
        assert a["total"] == 1.0
    # torch's default generator is reseeded at random, as in a new process: not where the last task left it
    for rank, a in enumerate(after):
        left_behind = torch.rand(3, generator=torch.Generator().manual_seed(rank + 99))
        assert not torch.equal(a["draw"], left_behind)


def test_failure_names_the_rank_and_retires_the_pool():
    pids = spawn(_fresh_state, 2)
    with pytest.raises(RuntimeError, match="rank 1 failed:(.|\n)*deliberate failure on rank 1"):
        spawn(_fail_on_rank_one, 2)
    again = spawn(_fresh_state, 2)
    assert {a["pid"] for a in again}.isdisjoint({p["pid"] for p in pids}), "a failed pool must not be reused"
    assert [a["total"] for a in again] == [1.0, 1.0]


def test_deadline_kills_the_pool():
    with pytest.raises(TimeoutError, match="still running"):
        spawn(_sleep, 2, 30, join_timeout_s=3)
    assert worker_pool._POOLS.get(2) is None or not worker_pool._POOLS[2].alive()


def _sleep(rank, world_size, seconds):
    import time
    time.sleep(seconds)


def test_a_pooled_training_run_equals_a_torchrun_launch(tmp_path):
    """The end-to-end tests run the trainer on the pool (tests/pooled_train.py); a real torchrun launch of
    the same config gives the same metrics, exit status and console lines, and a bad config the same status."""
    from train_utils import read_metrics, run_train, write_config
    config = write_config(tmp_path)
    layout = ("--parallel.tp=2", "--training.train_iters=3")
    runs = {how: run_train(config, str(tmp_path / how), *layout, nproc=2, launcher=how) for how in ("pool", "process")}
    rows = {how: [(r["iteration"], r["loss"], r["grad_norm"]) for r in read_metrics(str(tmp_path / how))]
            for how in runs}
    assert rows["pool"] == rows["process"] and len(rows["pool"]) == 3
    lines = {how: ["|".join(line.split("|")[1:6]) for line in run.stdout.splitlines() if "| iter " in line] for how, run in runs.items()}
    assert lines["pool"] == lines["process"] and len(lines["pool"]) == 3
    bad = {how: run_train(config, str(tmp_path / f"bad_{how}"), "--parallel.tp=3", nproc=2, check=False, launcher=how)
           for how in ("pool", "process")}
    assert bad["pool"].returncode == bad["process"].returncode == 1  # torchrun's status when a rank fails
    assert "parallel.tp" in bad["pool"].stderr and "parallel.tp" in bad["process"].stderr


ORPHANING = """
import os, sys
from megagopher import worker_pool
from megagopher.testing import spawn
assert spawn(max, 2) == [2, 2]  # max(rank, world_size): a module-level function the ranks can import
print(*(p.pid for p in worker_pool._POOLS[2]._procs), flush=True)
os._exit(0)  # no exit handlers, as a pytest-xdist worker ends: nothing stops the pool
"""


def test_ranks_end_when_their_parent_ends_without_cleanup(tmp_path):
    # Output to a file: the ranks inherit it, and a pipe would stay open while any of them runs.
    with open(tmp_path / "out", "w") as f:
        code = subprocess.run([sys.executable, "-c", ORPHANING], stdout=f, stderr=subprocess.STDOUT, timeout=120)
    out = (tmp_path / "out").read_text()
    assert code.returncode == 0, out[-3000:]
    pids = [int(p) for p in re.findall(r"^(\d+) (\d+)$", out, re.M)[-1]]
    assert len(pids) == 2
    wait_gone(pids, 10 * worker_pool.PARENT_CHECK_S)
