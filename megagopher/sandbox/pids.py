"""A process-count limit that also holds for root: one pids cgroup (cgroup v1's pids controller, or a
cgroup v2 directory that has pids.max) per sandboxed program.

RLIMIT_NPROC does not bind a process whose real user is root, even inside a user namespace (the kernel
exempts the root user outright), so a fork bomb run by a root evaluator would grow until the wall clock.
A pids cgroup's ``pids.max`` binds everyone. The child joins it before it execs anything (a shell writes
its own pid to ``cgroup.procs`` and execs the sandbox command), so nothing it starts is outside; after the
run every process listed in the cgroup is killed, whatever session it moved to, and the directory is
removed. Where no such cgroup can be made (no permission, no controller) ``create`` returns None and the
sandbox falls back to RLIMIT_NPROC.
"""
import functools
import itertools
import os
import signal
import time

_ROOTS = ("/sys/fs/cgroup/pids", "/sys/fs/cgroup")
_SERIAL = itertools.count()  # unique names for the cgroups of programs run at the same time


@functools.lru_cache(maxsize=1)
def _root():
    """The first cgroup directory under which a child with a pids.max can be created, or None."""
    for root in _ROOTS:
        probe = os.path.join(root, f"megagopher-sandbox-probe-{os.getpid()}")
        try:
            os.mkdir(probe)
        except OSError:
            continue
        try:
            usable = os.path.exists(os.path.join(probe, "pids.max"))
        finally:
            os.rmdir(probe)
        if usable:
            return root
    return None


def available():
    return _root() is not None


def create(limit):
    """A fresh pids cgroup with ``pids.max = limit``; its path, or None where none can be made."""
    root = _root()
    if root is None:
        return None
    path = os.path.join(root, f"megagopher-sandbox-{os.getpid()}-{next(_SERIAL)}")
    try:
        os.mkdir(path)
        with open(os.path.join(path, "pids.max"), "w") as f:
            f.write(str(int(limit)))
    except OSError:
        remove(path)
        return None
    return path


def joining(path, command):
    """``command`` run by a shell that first moves itself into the cgroup at ``path``."""
    return ["/bin/sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', path, *command]


def _members(path):
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            return [int(line) for line in f if line.strip()]
    except OSError:
        return []


def remove(path, patience_s=5.0):
    """Kills every process in the cgroup until none is left, then removes it."""
    deadline = time.monotonic() + patience_s
    while True:
        members = _members(path)
        for pid in members:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if not members or time.monotonic() > deadline:
            break
        time.sleep(0.01)  # killed processes leave the cgroup once reaped
    for _ in range(100):
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:  # still busy with dying processes
            time.sleep(0.01)
