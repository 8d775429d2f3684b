"""The sandboxed child (megagopher.sandbox): run as a script, ``python -I -B child.py``, in the program's
working directory. It reads the job (JSON) from stdin, sets the resource limits, remounts everything but
the working directory read-only (in its own mount namespace, when the parent made one), installs the
guard, runs the program with ``print`` shadowed, and writes one JSON object to the result file
descriptor the parent passed: {"status": "ok" | "error", "error", "printed", "repr", "str", "array",
"writable_mounts"}, or {"status": "timeout", "error"} past the CPU-time limit. It imports the standard
library only, so nothing outside the interpreter's own files runs before the guard is in place."""
import builtins
import faulthandler
import io
import json
import os
import posix
import re
import resource
import shutil
import signal
import subprocess
import sys
import traceback

VALUE_CHARS = 1 << 20   # a longer repr is not sent back


class SandboxViolation(PermissionError):
    pass


def set_limits(job):
    cpu = int(job["cpu_s"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU at the soft limit, SIGKILL at the hard
    for limit, value in ((resource.RLIMIT_AS, job["memory"]), (resource.RLIMIT_FSIZE, job["file"]),
                         (resource.RLIMIT_NPROC, job["nproc"]), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(limit, (int(value), int(value)))


# mount(2) flags (linux/mount.h), and the per-mount options a remount must keep (a user namespace may not
# clear them on mounts it inherited).
_MS_RDONLY, _MS_REMOUNT, _MS_BIND = 1, 32, 4096
_KEPT = {"nosuid": 2, "nodev": 4, "noexec": 8, "noatime": 1024, "nodiratime": 2048, "relatime": 1 << 21,
         "strictatime": 1 << 24}


def _mount_points():
    """(mount point, per-mount options) of this mount namespace, from /proc/self/mountinfo."""
    points = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            # octal escapes (\040 for a space) in the mount point
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            points.append((point, fields[5].split(",")))
    return points


def make_readonly(work):
    """In a mount namespace of its own (the parent asked for one): the working directory bind-mounted
    onto itself, then every other mount remounted read-only, so a write outside the directory fails in
    the kernel (EROFS) even from code that gets past the guard. Returns the mount points left writable
    (remounts the kernel refused)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
    if libc.mount(work.encode(), work.encode(), None, _MS_BIND, None) != 0:
        return ["(the working directory could not be bind-mounted: " + os.strerror(ctypes.get_errno()) + ")"]
    os.chdir(work)  # the old working directory is the directory under the new mount
    failed = []
    for point, options in _mount_points():
        if point == work or "ro" in options:
            continue
        flags = _MS_REMOUNT | _MS_BIND | _MS_RDONLY | sum(_KEPT.get(o, 0) for o in options)
        if libc.mount(None, point.encode(errors="surrogateescape"), None, flags, None) != 0:
            failed.append(point)
    return failed


def _refuse(name):
    def refused(*args, **kwargs):
        raise SandboxViolation(f"{name} is disabled in the sandbox")
    refused.__name__ = name.rpartition(".")[2]
    return refused


def _inside(root, path, dir_fd=None, devnull=False):
    """Whether ``path`` (after symlinks) lies in the working directory ``root`` (or, with ``devnull``, is
    /dev/null: writing there is harmless, removing it is not)."""
    if isinstance(path, int):
        return dir_fd is None  # an open descriptor: the file was already allowed when opened
    if dir_fd is not None:
        return False
    try:
        real = os.path.realpath(os.fsdecode(path))
    except (TypeError, ValueError):
        return False
    return real == root or real.startswith(root + os.sep) or (devnull and real == os.devnull)


def _path_checked(root, name, func, nargs=1):
    """``func`` refusing any of its first ``nargs`` path arguments outside ``root``."""
    def checked(*args, **kwargs):
        paths = list(args[:nargs]) or [kwargs.get(k) for k in ("path", "src", "dst") if k in kwargs]
        if not all(_inside(root, p, kwargs.get("dir_fd")) for p in paths):
            raise SandboxViolation(f"{name}({', '.join(map(repr, paths))}): outside the working directory")
        return func(*args, **kwargs)
    checked.__name__ = name
    return checked


_PROCESS_CALLS = ("kill", "killpg", "fork", "forkpty", "vfork", "system", "popen", "execv", "execve",
                  "execl", "execle", "execlp", "execlpe", "execvp", "execvpe", "spawnv", "spawnve", "spawnvp",
                  "spawnvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "posix_spawn", "posix_spawnp",
                  "setsid", "setpgid", "setuid", "seteuid", "setreuid", "setresuid", "setgid", "chroot",
                  "chdir", "fchdir", "pidfd_open", "plock")
_ONE_PATH = ("remove", "unlink", "rmdir", "removedirs", "truncate", "chmod", "lchmod", "chown", "lchown",
             "chflags", "lchflags", "mkdir", "makedirs", "mkfifo", "mknod", "utime", "setxattr",
             "removexattr")
_TWO_PATHS = ("rename", "renames", "replace", "link", "symlink")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _guard_open(root, real_open):
    def open_(file, mode="r", *args, **kwargs):
        writes = any(c in mode for c in "wax+")
        if writes and not isinstance(file, int) and not _inside(root, file, devnull=True):
            raise SandboxViolation(f"open({file!r}, {mode!r}): writing outside the working directory")
        return real_open(file, mode, *args, **kwargs)
    return open_


def _guard_os_open(root, real):
    def os_open(path, flags, *args, **kwargs):
        if flags & _WRITE_FLAGS and not _inside(root, path, kwargs.get("dir_fd"), devnull=True):
            raise SandboxViolation(f"os.open({path!r}): writing outside the working directory")
        return real(path, flags, *args, **kwargs)
    return os_open


def install_guard(job):
    """Disables the destructive calls (see megagopher.sandbox's docstring), in ``os`` and ``posix`` alike."""
    faulthandler.disable()
    root = os.path.realpath(os.getcwd())
    for module in (os, posix):
        for name in _PROCESS_CALLS:
            if hasattr(module, name):
                setattr(module, name, _refuse(f"os.{name}"))
        for names, nargs in ((_ONE_PATH, 1), (_TWO_PATHS, 2)):
            for name in names:
                if hasattr(module, name):
                    setattr(module, name, _path_checked(root, f"os.{name}", getattr(module, name), nargs))
        module.open = _guard_os_open(root, module.open)
    guarded_open = _guard_open(root, io.open)
    builtins.open = io.open = guarded_open
    shutil.rmtree = _path_checked(root, "shutil.rmtree", shutil.rmtree)
    shutil.move = _path_checked(root, "shutil.move", shutil.move, 2)
    shutil.chown = _path_checked(root, "shutil.chown", shutil.chown)
    subprocess.Popen = _refuse("subprocess.Popen")
    import _posixsubprocess
    _posixsubprocess.fork_exec = _refuse("_posixsubprocess.fork_exec")
    for name in ("pthread_kill", "pidfd_send_signal"):
        if hasattr(signal, name):
            setattr(signal, name, _refuse(f"signal.{name}"))
    blocked = ["resource", "ipdb", "joblib", "tkinter", "psutil"]
    if job.get("block_ctypes"):
        blocked += ["ctypes", "_ctypes"]
    if job.get("block_sockets"):
        _block_sockets()
    for name in blocked:
        sys.modules[name] = None  # `import name` now raises ImportError


def _block_sockets():
    import _socket
    import socket
    for module in (socket, _socket):
        for name in ("socket", "socketpair", "fromfd", "create_connection", "create_server", "getaddrinfo"):
            if hasattr(module, name):
                setattr(module, name, _refuse(f"socket.{name}"))


def plain_value(obj):
    """numpy and pandas values as Python ones (MTPB's check_equivalence does this first), inside lists,
    tuples, sets and dicts too (where MTPB's == would compare them as numbers); (value, is_array)."""
    kind = f"{type(obj).__module__}.{type(obj).__name__}"
    if kind.startswith("pandas.") and kind.endswith(".Series"):
        return obj.to_numpy().tolist(), True
    if kind.startswith("numpy.") and hasattr(obj, "tolist"):
        return obj.tolist(), False  # a scalar's tolist() is its Python number, an array's a nested list
    if type(obj) in (list, tuple, set, frozenset):
        return type(obj)(plain_value(x)[0] for x in obj), False
    if type(obj) is dict:
        return {plain_value(k)[0]: plain_value(v)[0] for k, v in obj.items()}, False
    return obj, False


def run(code):
    """Executes ``code`` as ``__main__``; returns the result object (the last print's first argument)."""
    printed = []
    real_print = builtins.print

    def print_(*args, **kwargs):
        printed.append(args)
        return real_print(*args, **kwargs)

    namespace = {"__name__": "__main__", "__builtins__": dict(vars(builtins), print=print_,
                                                              exit=_refuse("exit"), quit=_refuse("quit"))}
    outcome = {"status": "ok", "error": "", "printed": False, "repr": None, "str": None, "array": False}
    try:
        exec(compile(code, "<program>", "exec"), namespace)
    except BaseException as e:  # the program's own SystemExit and KeyboardInterrupt included
        tb = traceback.extract_tb(e.__traceback__)
        line = next((f" (line {f.lineno})" for f in reversed(tb) if f.filename == "<program>"), "")
        outcome.update(status="error", error=f"{type(e).__name__}: {e}{line}"[:2000])
    try:
        sys.stdout.flush()
    except OSError:  # stdout past RLIMIT_FSIZE: what was written stays
        pass
    if printed and printed[-1]:
        try:
            value, is_array = plain_value(printed[-1][0])
            text = repr(value)
            outcome.update(printed=True, array=is_array, str=str(printed[-1][0])[:VALUE_CHARS],
                           repr=text if len(text) <= VALUE_CHARS else None)
        except Exception as e:  # a value whose repr or str raises
            outcome.update(status="error", error=f"the printed value cannot be read back: {e!r}"[:2000])
    return outcome


def _write(fd, outcome):
    data = json.dumps(outcome).encode("utf-8")
    while data:
        data = data[posix.write(fd, data):]


def _on_cpu_limit(result_fd, seconds):
    """SIGXCPU's handler: reports the time-out itself (a signal's exit status does not come back through
    ``unshare --fork``) and exits at once; past the hard limit the kernel kills the process anyway."""
    def handler(signum, frame):
        _write(result_fd, {"status": "timeout", "error": f"CPU time limit of {seconds} s exceeded"})
        posix._exit(124)
    return handler


def main():
    job = json.load(sys.stdin)
    result_fd = int(job["result_fd"])
    set_limits(job)
    signal.signal(signal.SIGXCPU, _on_cpu_limit(result_fd, job["cpu_s"]))
    writable = make_readonly(os.path.realpath(os.getcwd())) if job.get("readonly") else []
    install_guard(job)
    outcome = run(job["code"])
    _write(result_fd, dict(outcome, writable_mounts=writable))


if __name__ == "__main__":
    main()
