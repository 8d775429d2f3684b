"""Long-lived gloo worker pools for multi-process tests: start ``world_size`` ranks once, run many functions.

Starting a gloo rank costs seconds (a fresh interpreter importing torch and megagopher, then the rendezvous),
and 8 such ranks on a 2-core machine cost about 10 s. A test suite that spawns fresh ranks for every check
spends most of its time starting processes; a pool keeps one set of ranks per world size alive and hands them
one function after another, each on the same default process group.

What a task may leave behind is undone between tasks, so every task starts as a fresh rank would (the
contract of ``megagopher.testing.spawn``): the process groups it created are destroyed, ``parallel_state`` is
reset, the environment, default dtype, grad mode and thread count are put back, and torch's default generator
is reseeded at random, as a new process's is.
A task that fails on any rank (or hangs past its deadline) retires the whole pool: the other ranks may be
stuck in a collective, so the pool is killed and the next call starts a new one.
"""
import atexit
import datetime
import faulthandler
import gc
import os
import pickle
import queue
import signal
import socket
import threading
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

def free_port():
    """A TCP port free on the loopback interface now (the rendezvous of a new set of ranks)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TaskFailed(RuntimeError):
    """A task raised on some rank; the message carries the failed ranks' tracebacks, in rank order."""


# After a first rank fails, how long the others may take to report their own errors (the first is often only a
# peer's broken connection) before the pool is killed.
FAILURE_GRACE_S = 3.0


class _Rank:
    """What a pool rank keeps between tasks: the store its default groups meet on, and the state a task must
    find as a fresh rank would (environment, working directory, signal handlers, no hang timer)."""

    def __init__(self, rank, world_size, port, timeout_s):
        torch.set_num_threads(1)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
        self.rank, self.world_size = rank, world_size
        self.timeout = datetime.timedelta(seconds=timeout_s)
        # Rank 0 hosts the store for the pool's life, so a task that ends the default group (the trainer's
        # clean shutdown does) is followed by a new one, met under a fresh key prefix on the same store.
        self.store = dist.TCPStore("127.0.0.1", port, world_size, is_master=rank == 0, timeout=self.timeout)
        self.generation = 0
        self.join_default_group()
        self.env, self.cwd = dict(os.environ), os.getcwd()
        self.handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def join_default_group(self):
        store = dist.PrefixStore(f"pool/{self.generation}/", self.store)
        dist.init_process_group("gloo", store=store, rank=self.rank, world_size=self.world_size,
                                timeout=self.timeout)
        self.generation += 1

    def reset(self):
        """Undoes what a finished task may have changed, so the next one starts as on a fresh rank."""
        from megagopher import parallel_state
        parallel_state.destroy_model_parallel()
        if dist.is_initialized():
            world = dist.group.WORLD
            for group in list(dist.distributed_c10d._world.pg_map):
                if group is not world:
                    dist.destroy_process_group(group)
        else:
            self.join_default_group()
        # A destroyed group's communicator lives until its last reference goes, and a task's model, hooks
        # and autograd graph hold groups in reference cycles: without a collection now, each idle gloo
        # group keeps a polling thread (gloo_tcp_loop) for as long as the pool lives.
        gc.collect()
        os.environ.clear()
        os.environ.update(self.env)
        os.chdir(self.cwd)
        for sig, handler in self.handlers.items():
            signal.signal(sig, handler)
        faulthandler.cancel_dump_traceback_later()  # a task's hang timer (exit=True) must not outlive it
        torch.seed()  # a new process starts from a random seed: a task must seed what it needs itself
        torch.set_default_dtype(torch.float32)
        torch.set_grad_enabled(True)
        torch.set_num_threads(1)


# How often an idle pool rank checks that the process that started it still runs.
PARENT_CHECK_S = 1.0


def _next_task(tasks):
    """The next task message; None when told to stop or once the parent is gone. A parent that ends without
    running its exit handlers (SIGKILLed, or ended by ``os._exit`` as pytest-xdist's workers are) cannot stop
    its daemonic ranks, which would otherwise wait on the queue forever, holding memory and polling threads."""
    parent = mp.parent_process()
    while True:
        try:
            return tasks.get(timeout=PARENT_CHECK_S)
        except queue.Empty:
            if parent is not None and not parent.is_alive():
                return None


def _serve(rank, world_size, port, timeout_s, tasks, results):
    """A pool rank: joins the default group once, then runs the tasks it is sent until it gets None."""
    me = _Rank(rank, world_size, port, timeout_s)
    while (message := _next_task(tasks)) is not None:
        fn, args = pickle.loads(message)
        try:
            out = {"ok": True, "value": fn(rank, world_size, *args)}
            if dist.is_initialized():
                dist.barrier()  # every rank is done with every collective before the groups go
            me.reset()
        except BaseException:  # noqa: BLE001 - reported to the parent, which retires the pool
            out = {"ok": False, "error": traceback.format_exc()}
        try:
            results.put((rank, pickle.dumps(out)))
        except Exception:  # noqa: BLE001 - an unpicklable result is the task's error, not the pool's
            results.put((rank, pickle.dumps({"ok": False, "error": traceback.format_exc()})))
    if dist.is_initialized():
        dist.destroy_process_group()


class WorkerPool:
    """``world_size`` gloo ranks on one free port, alive until ``close`` (or interpreter exit)."""

    def __init__(self, world_size, timeout_s):
        ctx = mp.get_context("spawn")
        self.world_size, self.timeout_s = world_size, timeout_s
        self._lock = threading.Lock()  # one task at a time: callers on several threads take turns
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        self._results = ctx.Queue()
        port = free_port()
        self._procs = [ctx.Process(target=_serve, args=(r, world_size, port, timeout_s, self._tasks[r], self._results),
                                   daemon=True) for r in range(world_size)]
        for p in self._procs:
            p.start()

    def alive(self):
        return all(p.is_alive() for p in self._procs)

    def run(self, fn, args, join_timeout_s):
        """fn(rank, world_size, *args) on every rank; the values by rank. Any failure retires the pool."""
        with self._lock:
            return self._run(fn, args, join_timeout_s)

    def _run(self, fn, args, join_timeout_s):
        message = pickle.dumps((fn, args))
        for q in self._tasks:
            q.put(message)
        outs, deadline = {}, time.monotonic() + join_timeout_s
        try:
            while len(outs) < self.world_size:
                failed = [r for r, out in outs.items() if not out["ok"]]
                if failed:  # the first error is often a peer's "connection closed": give the others a moment
                    deadline = min(deadline, time.monotonic() + FAILURE_GRACE_S)
                try:
                    rank, payload = self._results.get(timeout=1.0)
                except queue.Empty:
                    if time.monotonic() > deadline:
                        if failed:
                            break
                        raise TimeoutError(f"spawn: {self.world_size} ranks still running after {join_timeout_s} s")
                    if not self.alive():
                        raise TaskFailed(f"spawn: a pool rank died (exit codes {[p.exitcode for p in self._procs]})")
                    continue
                outs[rank] = pickle.loads(payload)
            failed = sorted(r for r, out in outs.items() if not out["ok"])
            if failed:
                raise TaskFailed("\n".join(f"rank {r} failed:\n{outs[r]['error']}" for r in failed))
        except BaseException:
            self.kill()
            raise
        return [outs[r]["value"] for r in range(self.world_size)]

    def kill(self):
        for p in self._procs:
            if p.is_alive():
                p.kill()
        for p in self._procs:
            p.join(timeout=5)

    def close(self):
        """Lets every rank leave the default group together, then joins them (killing any that lingers)."""
        for q in self._tasks:
            q.put(None)
        for p in self._procs:
            p.join(timeout=30)
        self.kill()


_POOLS = {}


def pool(world_size, timeout_s):
    """The live pool of ``world_size`` ranks whose collective timeout is at least ``timeout_s``, started if
    there is none (one pool per world size: a longer timeout replaces the shorter one)."""
    current = _POOLS.get(world_size)
    if current is not None and (not current.alive() or current.timeout_s < timeout_s):
        _POOLS.pop(world_size).kill()
        current = None
    if current is None:
        current = _POOLS[world_size] = WorkerPool(world_size, timeout_s)
    return current


def retire(world_size):
    if world_size in _POOLS:
        _POOLS.pop(world_size).kill()


@atexit.register
def close_all():
    while _POOLS:
        _POOLS.popitem()[1].close()
