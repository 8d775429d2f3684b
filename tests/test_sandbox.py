"""megagopher.sandbox: an ordinary program runs and its last printed value comes back; hostile programs (an
infinite loop, CPU burning, fork bombs with and without the guard's fork, memory bombs, writing and
deleting outside the working directory, a socket to a server this test runs, killing the evaluator) fail
alone and leave this process, its files and the machine's process table as they were."""
import os
import socket
import time

import pytest

from megagopher import sandbox as sb

FAST = sb.Limits(wall_s=3.0)
# Programs must start and finish within wall-clock limits of seconds: no other test runs meanwhile
# (tests/machine_share.py).
pytestmark = pytest.mark.alone


def _session_members(sid):
    """Processes still in session ``sid`` (the sandbox's child starts one)."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid:  # after the state: ppid, pgrp, session
                members.append(int(entry))
    return members


def _session_gone(sid, patience_s=10.0):
    """Whether session ``sid`` empties within ``patience_s``: killed processes take a moment to exit, and
    one whose parent died first waits for the machine's init to reap it."""
    deadline = time.monotonic() + patience_s
    while _session_members(sid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_program_runs_in_a_fresh_directory_and_its_last_print_comes_back():
    code = ("import os, numpy as np\nprint('files here:', os.listdir('.'))\n"
            "open('scratch.txt', 'w').write('mine')\nos.rename('scratch.txt', 'kept.txt')\n"
            "print(os.getcwd())\nprint(np.arange(3) * 2, 'ignored')\nprint((np.float32(0.5), np.bool_(True)))")
    first, second = sb.run_program(code, FAST), sb.run_program(code, FAST)
    assert first.status == "ok", first.error
    assert first.stdout.splitlines()[0] == "files here: []"          # nothing left by an earlier run
    assert first.stdout.splitlines()[1] != second.stdout.splitlines()[1]  # each run its own directory
    assert not os.path.exists(first.stdout.splitlines()[1])           # removed afterwards
    assert first.printed and first.value_literal and first.value == (0.5, True)
    assert type(first.value[1]) is bool                                # numpy values became Python ones
    assert _session_gone(first.pid)
    with pytest.raises(ValueError, match="limits out of range"):
        sb.Limits(wall_s=0)
    with pytest.raises(TypeError, match="str of Python source"):
        sb.run_program(b"print(1)")


def test_errors_exits_and_crashes_are_reported():
    assert sb.run_program("def f(:\n", FAST).error.startswith("SyntaxError")
    raised = sb.run_program("print(1)\nraise KeyError('k')", FAST)
    assert raised.status == "error" and "KeyError" in raised.error and raised.value == 1
    assert sb.run_program("import sys\nsys.exit(3)", FAST).status == "error"
    crashed = sb.run_program("import os\nos._exit(3)", FAST)
    assert crashed.status == "crashed" and crashed.returncode == 3


def test_an_infinite_loop_times_out_and_cpu_time_is_limited():
    start = time.monotonic()
    looped = sb.run_program("while True:\n    pass", sb.Limits(wall_s=2.0, cpu_s=30))
    assert looped.status == "timeout" and 2.0 <= looped.wall_s < 4.0 and time.monotonic() - start < 5.0
    burned = sb.run_program("while True:\n    pass", sb.Limits(wall_s=10.0, cpu_s=1))
    assert burned.status == "timeout" and "CPU time limit of 1 s" in burned.error and burned.wall_s < 8.0


def test_forking_and_executing_are_refused():
    code = ("import os, posix, subprocess, pty, multiprocessing\nrefused = []\n"
            "for name, attempt in [('fork', os.fork), ('posix.fork', posix.fork), ('forkpty', pty.fork),\n"
            "        ('system', lambda: os.system('true')), ('run', lambda: subprocess.run(['true'])),\n"
            "        ('execv', lambda: os.execv('/bin/true', ['true'])),\n"
            "        ('spawn', lambda: os.spawnv(0, '/bin/true', ['t'])),\n"
            "        ('process', lambda: multiprocessing.Process(target=print).start())]:\n"
            "    try:\n        attempt()\n    except PermissionError:\n        refused.append(name)\n"
            "print(refused)\nwhile True:\n    os.fork()\n")
    result = sb.run_program(code, FAST)
    assert result.value == ["fork", "posix.fork", "forkpty", "system", "run", "execv", "spawn", "process"]
    assert result.status == "error" and "os.fork is disabled" in result.error


def test_a_fork_bomb_past_the_guard_is_contained():
    before = len(os.listdir("/proc"))
    counted = ("import ctypes\nlibc = ctypes.CDLL(None)\nforked = failed = 0\nwhile failed < 50:\n"
               "    pid = libc.fork()\n    if pid == 0:\n        libc.pause()\n"
               "    forked, failed = (forked + 1, failed) if pid > 0 else (forked, failed + 1)\nprint(forked)")
    bomb = "import ctypes\nlibc = ctypes.CDLL(None)\nwhile True:\n    libc.fork()\n"
    limits = sb.Limits(wall_s=2.0, process_margin=16)
    capped, result = sb.run_program(counted, limits), sb.run_program(bomb, limits)
    if result.isolation["namespaces"] and result.isolation["process_limit"]:
        assert capped.status == "ok" and 0 < capped.value < 16  # the limit holds, the program goes on
        assert result.status == "timeout"  # the wall clock ends the bomb
    else:  # without both the sandbox does not let ctypes in
        assert "ctypes" in capped.error and "ctypes" in result.error
    assert _session_gone(result.pid) and _session_gone(capped.pid)
    assert len(os.listdir("/proc")) < before + 50


def test_memory_bombs_get_memory_errors():
    for code in ("x = bytearray(8 << 30)", "chunks = []\nwhile True:\n    chunks.append(bytearray(64 << 20))"):
        result = sb.run_program(code, sb.Limits(wall_s=3.0, memory_mb=512))
        assert result.status == "error" and "MemoryError" in result.error, (code, result)
    big_file = sb.run_program("open('big', 'wb').write(bytes(8 << 20))", sb.Limits(wall_s=3.0, file_mb=1))
    assert big_file.status == "error" and "File too large" in big_file.error


@pytest.mark.parametrize("mode", ["auto", "guard"])
def test_writing_and_deleting_outside_the_working_directory_are_refused(tmp_path, mode):
    victim, folder = tmp_path / "victim.txt", tmp_path / "folder"
    victim.write_text("precious")
    folder.mkdir()
    (folder / "inner.txt").write_text("also precious")
    attempts = [f"open({str(victim)!r}, 'w')", f"open({str(tmp_path / 'new.txt')!r}, 'x')",
                f"os.remove({str(victim)!r})", f"posix.unlink({str(victim)!r})",
                f"os.rename({str(victim)!r}, 'stolen')", f"shutil.rmtree({str(folder)!r})",
                f"shutil.move({str(folder)!r}, 'moved')", f"os.chmod({str(victim)!r}, 0)",
                f"pathlib.Path({str(victim)!r}).write_text('x')", f"os.open({str(victim)!r}, os.O_WRONLY)",
                f"os.symlink({str(victim)!r}, 'link') or open('link', 'w')", "os.chdir('/')",
                f"os.truncate({str(victim)!r}, 0)", f"os.rmdir({str(folder)!r})", "os.remove(os.devnull)"]
    code = "import os, posix, shutil, pathlib\nrefused = 0\n" + "".join(
        f"try:\n    {a}\nexcept PermissionError:\n    refused += 1\n" for a in attempts) + (
        "open(os.devnull, 'w').write('harmless')\nopen('mine.txt', 'w').write('fine')\n"
        "try:  # past the guard: the C library itself\n    import ctypes\n"
        "    libc = ctypes.CDLL(None, use_errno=True)\n"
        f"    direct = [libc.open({str(victim).encode()!r}, os.O_WRONLY | os.O_TRUNC),\n"
        f"              libc.unlink({str(victim).encode()!r}), libc.rmdir({str(folder).encode()!r}),\n"
        "              libc.open(b'/etc/sandbox-was-here', os.O_WRONLY | os.O_CREAT, 0o644)]\n"
        "    direct.append(os.strerror(ctypes.get_errno()))\nexcept ImportError:\n    direct = 'no ctypes'\n"
        "print((refused, direct))")
    result = sb.run_program(code, FAST, mode=mode)
    assert result.status == "ok", result
    held = [-1, -1, -1, -1, "Read-only file system"] if result.isolation["namespaces"] else "no ctypes"
    assert result.value == (len(attempts), held) and result.writable_mounts == []
    assert victim.read_text() == "precious" and (folder / "inner.txt").read_text() == "also precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "victim.txt"]
    assert not os.path.exists("/etc/sandbox-was-here") and os.path.exists(os.devnull)


@pytest.mark.parametrize("mode", ["auto", "guard"])
def test_no_socket_reaches_a_local_server(mode):
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        code = (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                "s.sendall(b'leak')\nprint('connected')")
        result = sb.run_program(code, sb.Limits(wall_s=3.0), mode=mode)
        server.setblocking(False)
        with pytest.raises(BlockingIOError):  # no connection is waiting in the listen queue
            server.accept()
    assert result.status == "error" and not result.printed, result
    expected = "Network is unreachable" if result.isolation["namespaces"] else "socket.create_connection is disabled"
    assert expected in result.error
    assert result.isolation["namespaces"] == (mode == "auto" and sb.namespaces_available())


@pytest.mark.parametrize("mode", ["auto", "guard"])
def test_killing_the_evaluator_is_refused(mode):
    me = os.getpid()
    code = (f"import os, signal\nrefused = 0\nfor attempt in (lambda: os.kill({me}, signal.SIGKILL),\n"
            f"        lambda: os.killpg({os.getpgid(me)}, signal.SIGKILL), lambda: os.kill(os.getppid(), 9),\n"
            f"        lambda: signal.pthread_kill(1, 9)):\n"
            "    try:\n        attempt()\n    except PermissionError:\n        refused += 1\n"
            "try:\n    import ctypes\n    print((refused, ctypes.CDLL(None).kill(" + str(me) + ", 9)))\n"
            "except ImportError:\n    print((refused, 'no ctypes'))\n")
    result = sb.run_program(code, FAST, mode=mode)
    assert result.status == "ok", result
    # Past the guard the kill finds no such process: the evaluator is outside the PID namespace.
    assert result.value == ((4, -1) if result.isolation["namespaces"] else (4, "no ctypes"))
    assert os.getpid() == me
