"""Helpers for multi-process tests on CPU: run a function on gloo ranks and collect their results.

Used by megagopher's own tests and usable by anyone testing code built on the parallel layers. Each rank
runs ``fn(rank, world_size, *args)`` with one intra-op thread; the return values come back as a list
indexed by rank, and an exception on any rank is re-raised in the caller with that rank's traceback. By
default the ranks are a long-lived pool per world size (``worker_pool.py``), so a suite pays the start of
8 ranks once rather than once per test; ``reuse=False`` starts fresh processes (a benchmark that measures
a process's peak memory wants those).
"""
import os
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megagopher import worker_pool
from megagopher.worker_pool import free_port  # noqa: F401 - part of this module's API


def _worker(rank, fn, world_size, port, result_dir, args, timeout_s):
    import datetime
    import pickle
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    out = {"ok": False}
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        out = {"ok": True, "value": fn(rank, world_size, *args)}
    except BaseException:  # noqa: BLE001 - reported to the parent
        out = {"ok": False, "error": traceback.format_exc()}
    finally:
        from megagopher import parallel_state
        parallel_state.destroy_model_parallel()
        with open(os.path.join(result_dir, f"{rank}.pkl"), "wb") as f:
            pickle.dump(out, f)
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(fn, world_size, *args, timeout_s=120, join_timeout_s=900, reuse=True):
    """Runs fn(rank, world_size, *args) on ``world_size`` gloo ranks; returns the per-rank results.

    A rank that fails alone can leave the others waiting in a collective; gloo's own timeout
    (``timeout_s``) ends most such waits, and ``join_timeout_s`` bounds the whole run: past it every rank
    is killed and the call fails, instead of hanging the test session. ``fn`` must be a module-level
    function (it is sent by name); under ``reuse`` it must not destroy the default process group."""
    if reuse:
        # one collective timeout per pool: the longest any caller has asked for, so the pool is not restarted
        pool = worker_pool.pool(world_size, max(timeout_s, POOL_TIMEOUT_S))
        return pool.run(fn, args, join_timeout_s)
    return _spawn_fresh(fn, world_size, args, timeout_s, join_timeout_s)


# A pooled rank's gloo timeout: what the slowest multi-process tests pass (a hung collective fails after it).
POOL_TIMEOUT_S = 300


def _spawn_fresh(fn, world_size, args, timeout_s, join_timeout_s):
    import pickle
    import time
    with tempfile.TemporaryDirectory() as result_dir:
        context = mp.start_processes(_worker, args=(fn, world_size, free_port(), result_dir, args, timeout_s),
                                     nprocs=world_size, join=False, start_method="spawn")
        deadline = time.monotonic() + join_timeout_s
        try:
            while not context.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"spawn: {world_size} ranks still running after {join_timeout_s} s")
        except Exception:
            for proc in context.processes:
                if proc.is_alive():
                    proc.kill()
            raise
        results = []
        for rank in range(world_size):
            with open(os.path.join(result_dir, f"{rank}.pkl"), "rb") as f:
                out = pickle.load(f)
            if not out["ok"]:
                raise RuntimeError(f"rank {rank} failed:\n{out['error']}")
            results.append(out["value"])
        return results


def gather_tensor_parallel(param, tensor):
    """The full tensor of ``param`` (its value or gradient ``tensor``, this TP rank's shard) joined over the TP
    group along the parameter's split dimension, vocabulary padding dropped; a replicated one as it is."""
    from megagopher import parallel_state as ps
    dim = getattr(param, "partition_dim", None)
    if dim is None or ps.get_tp_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(ps.get_tp_size())]
    dist.all_gather(parts, tensor.contiguous(), group=ps.get_tp_group())
    return torch.cat(parts, dim=dim).narrow(dim, 0, param.full_shape[dim])
