"""Rank faults under torchrun (training/watchdog.py): a finished run exits 0 on every rank, every time, even
on a loaded machine; a killed worker or a killed launcher ends every other rank promptly with one line
naming what was lost, and leaves no worker behind."""
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch.distributed as dist

from megagopher.testing import free_port
from megagopher.training import watchdog as wd
from train_utils import ROOT, launcher_children, read_metrics, run_train, wait_gone, write_config

TIMEOUT_S = 20  # parallel.timeout_s of the fault runs: the bound "timeout_s + 30 s" stays short
# Their ranks must meet within TIMEOUT_S and each bound counts seconds: no other test of the suite runs meanwhile
# (tests/machine_share.py). The load test makes its own load, known and fixed.
pytestmark = pytest.mark.alone


def _burner():
    """A process that keeps one core busy, like another job sharing the machine."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def test_finished_runs_exit_zero_on_every_rank_under_load(tmp_path):
    # Two rounds of three 2-rank jobs at once (dp2 and tp2) next to a busy core: 7 busy processes on 2 cores,
    # the load under which a rank used to abort in its process groups' destructors after the last step.
    config = write_config(tmp_path)
    jobs = [(f"{kind}{n}", ["--parallel.tp=2"] if kind == "tp" else []) for n in range(3) for kind in ("dp", "tp")]
    burner = _burner()
    try:
        with ThreadPoolExecutor(3) as pool:
            procs = list(pool.map(lambda job: run_train(config, str(tmp_path / job[0]), *job[1], nproc=2,
                                                        check=False, launcher="process"), jobs))
    finally:
        burner.kill()
        burner.wait()
    for (name, _), proc in zip(jobs, procs):
        assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
        assert "terminate called" not in proc.stderr and "ending rank" not in proc.stderr, proc.stderr[-3000:]
        assert [r["iteration"] for r in read_metrics(str(tmp_path / name))] == [1, 2, 3, 4]


# -- a lost rank or launcher under torchrun ------------------------------------------------------------------
def _launch(tmp_path, nproc, *overrides, timeout_s=TIMEOUT_S):
    """A torchrun job that trains until it is killed; its output goes to ``out.log``."""
    log = open(tmp_path / "out.log", "w")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}",
           "-m", "megagopher.train", "--config", write_config(tmp_path), f"--run.dir={tmp_path / 'run'}",
           "--training.train_iters=1000000", "--training.log_interval=1000000", f"--parallel.timeout_s={timeout_s}",
           *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    # Its own session, so that the test can kill the launcher alone.
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
    log.close()
    return proc


def _output(tmp_path):
    return (tmp_path / "out.log").read_text()


def _wait_for_a_step(proc, tmp_path, nproc, limit_s=180):
    """The worker pids by rank, once every worker runs and the first step is in metrics.jsonl."""
    deadline = time.monotonic() + limit_s
    metrics = tmp_path / "run" / "metrics.jsonl"
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the job ended early ({proc.returncode}):\n{_output(tmp_path)[-3000:]}"
        workers = _workers(proc.pid)
        if len(workers) == nproc and metrics.exists() and metrics.read_text().strip():
            return workers
        time.sleep(0.2)
    raise AssertionError(f"no step after {limit_s} s:\n{_output(tmp_path)[-3000:]}")


def _workers(launcher_pid):
    """{rank: pid} of the launcher's children, read from /proc (their RANK variable)."""
    found = {}
    for pid in launcher_children(launcher_pid):
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        ranks = [v[5:] for v in env if v.startswith(b"RANK=")]
        if ranks:
            found[int(ranks[0])] = pid
    return found


def _kill_all(proc, pids):
    """Cleanup after a failed assertion: no process of the test outlives it."""
    for pid in [proc.pid, *pids]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def test_killed_worker_ends_every_rank_naming_it(tmp_path):
    proc = _launch(tmp_path, 4, "--parallel.tp=2")
    workers = {}
    try:
        workers = _wait_for_a_step(proc, tmp_path, 4)
        os.kill(workers[2], signal.SIGKILL)
        start = time.monotonic()
        proc.wait(timeout=TIMEOUT_S + 30)
        elapsed = time.monotonic() - start
        wait_gone(workers.values(), 5)
    finally:
        _kill_all(proc, workers.values())
    out = _output(tmp_path)
    assert elapsed < TIMEOUT_S + 30 and proc.returncode != 0, out[-3000:]
    for rank in (0, 1, 3):  # each survivor ended itself (status 5, not the launcher's signals), naming rank 2
        assert f"megagopher: rank 2 is gone (its process exited or was killed); ending rank {rank}" in out, out[-3000:]
        assert re.search(rf"exitcode\s*:\s*5 \(pid: {workers[rank]}\)", out), out[-3000:]
    assert "/megagopher/" not in out, out[-3000:]  # no worker printed a traceback


def test_hung_worker_is_named_after_the_threshold(tmp_path):
    # A stopped process still exists: only its silent heartbeat gives it away, after threshold_for(10) = 10 s.
    proc = _launch(tmp_path, 2, timeout_s=10)
    workers = {}
    try:
        workers = _wait_for_a_step(proc, tmp_path, 2)
        os.kill(workers[1], signal.SIGSTOP)
        elapsed = wait_gone([workers[0]], 10 + 30)
    finally:
        _kill_all(proc, workers.values())  # the stopped rank cannot act on torchrun's SIGTERM
    out = _output(tmp_path)
    # Silence counts from the last beat its watcher saw, which comes up to one watch interval before the stop.
    assert 10 - wd.INTERVAL_S <= elapsed < 10 + 30, f"{elapsed:.1f} s:\n{out[-3000:]}"
    assert re.search(r"megagopher: rank 1 stopped responding for \d+ s \(its process is hung or its node is "
                     r"unreachable\); ending rank 0", out), out[-3000:]


def test_killed_launcher_ends_its_workers(tmp_path):
    proc = _launch(tmp_path, 2)
    workers = {}
    try:
        workers = _wait_for_a_step(proc, tmp_path, 2)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        elapsed = wait_gone(workers.values(), TIMEOUT_S)
    finally:
        _kill_all(proc, workers.values())
    out = _output(tmp_path)
    assert elapsed < TIMEOUT_S / 2, f"{elapsed:.1f} s:\n{out[-3000:]}"
    for rank in (0, 1):
        assert f"megagopher: the launcher (torchrun, pid {proc.pid}) is gone; ending rank {rank}" in out, out[-3000:]


# -- the watchdog on its own ---------------------------------------------------------------------------------
def _watchdogs(store, world, threshold_s):
    verdicts = {r: [] for r in range(world)}
    dogs = [wd.Watchdog(store, r, world, threshold_s, interval_s=0.05, on_verdict=verdicts[r].append).start()
            for r in range(world)]
    return dogs, verdicts


def test_watchdog_names_a_silent_rank_and_spares_a_finished_one():
    store = dist.HashStore()
    dogs, verdicts = _watchdogs(store, 4, threshold_s=0.6)
    time.sleep(1.0)
    dogs[3].stop()  # a clean end: rank 2, which watched it, must move on to rank 0, not blame it
    time.sleep(1.5)
    assert not any(verdicts.values()), verdicts
    dogs[1]._halt.set()  # rank 1 stops beating without a clean stop: hung, or its node is gone
    dogs[1]._thread.join()
    deadline = time.monotonic() + 5
    while not (verdicts[0] and verdicts[2]) and time.monotonic() < deadline:
        time.sleep(0.05)
    for rank in (0, 2):
        assert len(verdicts[rank]) == 1 and verdicts[rank][0].startswith("megagopher: rank 1 stopped responding"), \
            verdicts
        assert verdicts[rank][0].endswith(f"; ending rank {rank}")
    assert not verdicts[1] and not verdicts[3]
    for dog in (dogs[0], dogs[1], dogs[2]):
        dog.stop()


class _DeadStore:
    """A store whose server has gone: every call fails as c10d's client does."""

    def __getattr__(self, name):
        def fail(*args):
            raise dist.DistNetworkError("Broken pipe")
        return fail


def test_watchdog_ends_a_rank_whose_store_is_gone():
    verdicts = []

    def refuse():
        raise ConnectionError("[Errno 111] Connection refused")

    dog = wd.Watchdog(dist.HashStore(), 0, 2, 5.0, interval_s=0.05, on_verdict=verdicts.append, connect=refuse,
                      where="127.0.0.1:1")
    dog.start().store = _DeadStore()
    deadline = time.monotonic() + 5
    while not verdicts and time.monotonic() < deadline:
        time.sleep(0.05)
    assert verdicts == ["megagopher: the rendezvous store at 127.0.0.1:1 is unreachable ([Errno 111] Connection "
                        "refused): the launcher or the rank that hosts it is gone; ending rank 0"]
    dog.stop()


def test_process_identity_and_error_kinds():
    mine = wd.process_identity()
    assert mine and not wd.process_gone(mine)
    namespace = mine.split()[0]
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        started = open(f"/proc/{child.pid}/stat").read().rpartition(")")[2].split()[19]
        theirs = f"{namespace} {child.pid} {started}"
        assert not wd.process_gone(theirs)
        assert wd.process_gone(f"{namespace} {child.pid} {int(started) + 1}")  # its pid, now another process
        assert not wd.process_gone(f"another-machine {child.pid} {started}")  # this machine cannot tell
        child.kill()
        wait_gone([child.pid], 5)
        assert wd.process_gone(theirs)  # a zombie, not reaped yet, has ended
    finally:
        child.kill()
        child.wait()
    assert wd.process_gone(theirs)
    gloo = RuntimeError("[third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:1")
    assert wd.is_communication_error(gloo) and wd.is_communication_error(dist.DistNetworkError("Broken pipe"))
    assert not wd.is_communication_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert [wd.threshold_for(t) for t in (3, 20, 600)] == [10.0, 20.0, 60.0]
