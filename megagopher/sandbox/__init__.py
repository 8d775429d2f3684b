"""Running untrusted Python (model-written programs) so that a hostile or broken one fails alone.

    result = run_program(code, Limits(wall_s=3))   # Result(status, value, printed, error, stdout, ...)

Each program runs in its own subprocess (a new session, so one process group holds it and whatever it
starts), in a fresh temporary working directory, with these layers, outermost first:

* Namespaces, where the OS allows them (probed once with ``unshare``): a user namespace, a network
  namespace (only a loopback interface that is down, so no socket reaches anything, the local machine
  included), a PID namespace (the program sees no other process; when its first process dies the kernel
  kills every process left in it) and a mount namespace in which every mount but the working directory
  is remounted read-only (a write elsewhere fails with EROFS, from any code). Without namespaces the
  guard below also disables sockets.
* A process limit: a pids cgroup of its own where one can be made (megagopher.sandbox.pids; it binds
  root too), else RLIMIT_NPROC (the user's processes now plus a margin; the kernel ignores it for root).
* Resource limits: CPU time (RLIMIT_CPU; SIGXCPU past it, reported as a time-out), address space
  (RLIMIT_AS: a memory bomb gets MemoryError), file size (RLIMIT_FSIZE; stdout goes to a file, so
  endless printing is cut off too), no core files. The parent keeps the wall clock: past it, and after
  every run, the whole process group (and the cgroup) is killed.
* A guard installed in the child before the program runs, like human-eval's reliability_guard: killing,
  forking and executing (os.kill/killpg, fork/forkpty, system/popen, exec*/spawn*/posix_spawn,
  subprocess, signal.pthread_kill), chdir/chroot/setuid, and ``resource`` (so no limit is raised) are
  refused with a PermissionError; writing, creating, removing, renaming or changing the mode of a path
  outside the working directory (open for writing, os.open, os.remove/unlink/rmdir/rename/replace/...,
  shutil.rmtree/move) is refused. It patches both ``os`` and ``posix``. It is no security boundary on
  its own: code that calls the C library itself (ctypes) gets past it, which the layers above then hold
  (a kill finds no process outside the PID namespace, a write meets a read-only mount, a fork bomb the
  process limit); where they are not all in place ``ctypes`` cannot be imported.

What the program prints goes to stdout (returned, cut to ``Limits.stdout_chars``). ``print`` is shadowed so
that the first argument of the last print call is captured (MTPB scores that object; megagopher.evaluation
.mtpb): numpy and pandas values are turned into Python ones in the child (``plain_value``) and sent back as
``repr``, which the parent reads with ``ast.literal_eval`` (``Result.value``; ``Result.value_str`` is the
object's ``str``, for values that are not literals).

The child is megagopher/sandbox/child.py run as a script by the same interpreter (``python -I -B child.py``),
so it imports nothing but the standard library before the program runs.
"""
import ast
import functools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from megagopher.sandbox import pids

STATUSES = ("ok", "error", "timeout", "crashed")
CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "child.py")


@dataclass(frozen=True)
class Limits:
    wall_s: float = 10.0             # wall clock, kept by the parent
    cpu_s: int = 0                   # RLIMIT_CPU; 0: ceil(wall_s) + 1
    memory_mb: int = 1024            # RLIMIT_AS
    file_mb: int = 16                # RLIMIT_FSIZE (stdout included)
    process_margin: int = 64         # pids.max of its cgroup; RLIMIT_NPROC = the user's processes now + this
    stdout_chars: int = 65536        # the stdout returned

    def __post_init__(self):
        if not self.wall_s > 0 or self.cpu_s < 0 or self.memory_mb < 64 or self.file_mb < 1 \
                or self.process_margin < 1 or self.stdout_chars < 0:
            raise ValueError(f"sandbox limits out of range: {self} (wall_s > 0, cpu_s >= 0, memory_mb >= 64, "
                             "file_mb >= 1, process_margin >= 1, stdout_chars >= 0)")


@dataclass
class Result:
    status: str                      # one of STATUSES
    value: object = None             # the last print's first argument (literal_eval of its repr)
    value_str: str = None            # its str(), for values that are no literal
    value_literal: bool = False      # its repr was read back (value is meaningful)
    value_is_array: bool = False     # it was a pandas Series (MTPB compares those with np.allclose)
    printed: bool = False            # print was called with an argument
    error: str = ""
    stdout: str = ""
    returncode: int = None
    wall_s: float = 0.0
    pid: int = None                  # the child's process id (its session and process group id)
    writable_mounts: list = field(default_factory=list)  # mounts the read-only remount could not change
    isolation: dict = field(default_factory=dict)

    @property
    def ok(self):
        return self.status == "ok"


# -- the parent side ----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def namespaces_available():
    """Whether ``unshare`` can give a child user, network, PID and mount namespaces here (probed once per
    process)."""
    unshare = shutil.which("unshare")
    if unshare is None or not sys.platform.startswith("linux"):
        return False
    # Inside, the program must be process 1 of its PID namespace and see one network interface (lo).
    probe = "import os, socket; print(os.getpid(), len(socket.if_nameindex()))"
    try:
        proc = subprocess.run(_namespace_prefix(unshare) + [sys.executable, "-I", "-c", probe],
                              capture_output=True, timeout=20, start_new_session=True)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0 and proc.stdout.split() == [b"1", b"1"]


def _namespace_prefix(unshare):
    return [unshare, "--user", "--map-root-user", "--net", "--pid", "--mount", "--fork", "--kill-child"]


def isolation(mode="auto"):
    """How a program will run: {"namespaces", "pids_cgroup", "process_limit"} (bools). ``mode``: "auto"
    (namespaces and a pids cgroup where available) or "guard" (the guard and the rlimits only)."""
    if mode not in ("auto", "guard"):
        raise ValueError(f"sandbox isolation {mode!r}; valid: auto, guard")
    namespaces = mode == "auto" and namespaces_available()
    cgroup = mode == "auto" and pids.available()
    # The kernel never applies RLIMIT_NPROC to the root user, user namespace or not.
    return {"namespaces": namespaces, "pids_cgroup": cgroup, "process_limit": cgroup or os.getuid() != 0}


def _user_processes(uid):
    """How many processes (threads count too for RLIMIT_NPROC, but a margin covers them) ``uid`` owns."""
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/status", encoding="ascii", errors="replace") as f:
                    uid_line = next(line for line in f if line.startswith("Uid:"))
            except (OSError, StopIteration):
                continue
            count += int(uid_line.split()[1]) == uid
    return count


def _child_env():
    keep = {k: os.environ[k] for k in ("PATH", "LANG", "LC_ALL", "SYSTEMROOT") if k in os.environ}
    # One thread per math library: threads count against RLIMIT_NPROC and the address-space limit.
    return dict(keep, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")


def _kill_group(pgid):
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_program(code, limits=None, mode="auto"):
    """Runs ``code`` (Python source) in a sandboxed subprocess; see the module docstring. Never raises
    for anything the program does."""
    if not isinstance(code, str):
        raise TypeError(f"the program must be a str of Python source, got {type(code).__name__}")
    limits = limits or Limits()
    how = isolation(mode)
    cpu = limits.cpu_s or math.ceil(limits.wall_s) + 1
    job = {"code": code, "cpu_s": cpu, "memory": limits.memory_mb << 20, "file": limits.file_mb << 20,
           "nproc": _user_processes(os.getuid()) + limits.process_margin,
           "block_sockets": not how["namespaces"], "readonly": how["namespaces"],
           # past the guard only the namespaces stop a kill or a write and only a process limit a fork bomb
           "block_ctypes": not (how["namespaces"] and how["process_limit"])}
    command = [sys.executable, "-I", "-B", CHILD]
    if how["namespaces"]:
        command = _namespace_prefix(shutil.which("unshare")) + command
    cgroup = pids.create(limits.process_margin) if how["pids_cgroup"] else None
    if cgroup is not None:
        command = pids.joining(cgroup, command)
    try:
        return _run(command, job, limits, how)
    finally:
        if cgroup is not None:
            pids.remove(cgroup)


def _run(command, job, limits, how):
    with tempfile.TemporaryDirectory(prefix="megagopher-sandbox-", ignore_cleanup_errors=True) as root:
        work = os.path.join(root, "work")
        os.mkdir(work)
        with open(os.path.join(root, "job.json"), "w+", encoding="utf-8") as job_f, \
                open(os.path.join(root, "stdout"), "w+b") as out_f, \
                open(os.path.join(root, "stderr"), "w+b") as err_f, \
                open(os.path.join(root, "result.json"), "w+b") as res_f:
            job["result_fd"] = res_f.fileno()
            json.dump(job, job_f)
            job_f.flush()
            job_f.seek(0)
            start = time.monotonic()
            proc = subprocess.Popen(command, stdin=job_f, stdout=out_f, stderr=err_f, cwd=work,
                                    env=_child_env(), start_new_session=True, pass_fds=(res_f.fileno(),))
            try:
                proc.wait(timeout=limits.wall_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            _kill_group(proc.pid)  # whatever it started, also after a normal exit
            proc.wait()
            wall = time.monotonic() - start
            outputs = [_read_head(f, limits.stdout_chars) for f in (out_f, err_f)]
            res_f.seek(0)
            raw = res_f.read()
    return _result(raw, proc, timed_out, outputs, wall, how, limits)


def _read_head(f, chars):
    f.seek(0)
    return f.read(max(chars, 0) * 4).decode("utf-8", errors="replace")[:chars]


def _result(raw, proc, timed_out, outputs, wall, how, limits):
    stdout, stderr = outputs
    returncode = proc.returncode
    common = {"stdout": stdout, "returncode": returncode, "wall_s": wall, "pid": proc.pid, "isolation": how}
    if timed_out:
        return Result("timeout", error=f"wall-clock limit of {limits.wall_s} s exceeded", **common)
    try:
        outcome = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        why = f"killed by signal {-returncode}" if returncode is not None and returncode < 0 \
            else f"exited with status {returncode} before reporting"
        tail = stderr.strip().splitlines()[-1:] or [""]
        return Result("crashed", error=f"{why} {tail[0]}".strip(), **common)
    if not isinstance(outcome, dict) or outcome.get("status") not in STATUSES:
        return Result("crashed", error="the child's report is malformed", **common)
    value, literal = None, False
    if outcome.get("repr") is not None:
        try:
            value, literal = ast.literal_eval(outcome["repr"]), True
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            pass
    return Result(outcome["status"], value=value, value_str=outcome.get("str"), value_literal=literal,
                  value_is_array=bool(outcome.get("array")), printed=bool(outcome.get("printed")),
                  error=outcome.get("error", ""), writable_mounts=outcome.get("writable_mounts", []), **common)

