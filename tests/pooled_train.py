"""``python -m megagopher.train`` run inside the pooled gloo ranks of megagopher.testing.spawn.

Why: a torchrun launch of 8 ranks costs most of its time starting interpreters that import torch, and the
end-to-end tests launch the trainer over a hundred times. The trainer takes a process group its caller
made (training/distributed.py setup_distributed), so the pool's ranks can run ``megagopher.train.main``
one run after another. The result looks like the launch it replaces (a CompletedProcess): the ranks'
stdout and stderr in rank order, and torchrun's exit code (0, or 1 when any rank failed); one rank alone
returns its own status, as ``python -m megagopher.train`` does. Runs that need real processes (signals,
killed ranks, restarts, the watchdog) start them: tests/fault_injection.py, ``launch_ranks``, or
``run_train(..., launcher="process")``.
"""
import contextlib
import io
import os
import subprocess
import sys
import traceback

from megagopher.testing import spawn
from megagopher.worker_pool import TaskFailed


class _RankFailed(Exception):
    """The trainer raised on a rank: the pool must be retired (the other ranks may wait in a collective)."""


def _train_rank(rank, world_size, argv, cwd, env):
    from megagopher import train
    os.chdir(cwd)
    os.environ.update(env)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = train.main(argv)
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # noqa: BLE001 - the launch's stderr, as torchrun would show it
            raise _RankFailed(out.getvalue() + err.getvalue() + traceback.format_exc())
    return int(status or 0), out.getvalue(), err.getvalue()


def run_in_pool(argv, nproc, cwd, env, timeout):
    """The trainer with ``argv`` on ``nproc`` pooled ranks; a CompletedProcess like the launch it replaces."""
    cmd = [sys.executable, "-m", "megagopher.train", *argv]
    try:
        ranks = spawn(_train_rank, nproc, list(argv), cwd, dict(env), join_timeout_s=timeout)
    except TaskFailed as e:
        return subprocess.CompletedProcess(cmd, 1, "", str(e))
    statuses = [status for status, _, _ in ranks]
    code = statuses[0] if nproc == 1 else int(any(statuses))
    return subprocess.CompletedProcess(cmd, code, "".join(o for _, o, _ in ranks), "".join(e for _, _, e in ranks))
