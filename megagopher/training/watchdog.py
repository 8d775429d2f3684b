"""A dead rank ends the job: a daemon thread on every rank of a multi-rank run (started by
``training/distributed.py`` ``setup_distributed``) that turns "a peer is gone" into a prompt exit with one line
naming the lost rank, instead of every other rank waiting in a collective until ``parallel.timeout_s``.

Each second (``INTERVAL_S``) a rank increments its heartbeat counter in the rendezvous store and looks at
one other rank, the next one that has not ended cleanly: rank r watches rank r + 1 (mod world size). The
watched rank is lost when its process is gone (same machine: its pid no longer names the process that
published it, or names a zombie) or when its counter has not moved for ``threshold_for(parallel.timeout_s)``
seconds of the watcher's own ticks. The watcher then writes one verdict under the key ``dead``; every rank
reads that key on each tick, prints the verdict and exits with ``EXIT_PEER_LOST``. A rank also exits when
its launcher is gone (under torchrun: its parent process changed) or when the store cannot be reached.

Why heartbeats through the store: the store is the one service every rank already reaches, on any
number of nodes, and it keeps working when a collective is stuck. Counters that move say "alive" without
comparing wall clocks across machines, which need not agree. The thread has its own connection to the
store, so it is never queued behind a blocking store call of the main thread (gloo's rendezvous of a new
group waits on keys other ranks have not written yet).

Why a hard exit (``os._exit``): the main thread is usually blocked inside a collective that will not
return, and Python cannot interrupt it; unwinding normally would also run the process groups'
destructors against sockets whose peer is gone, which can hang or abort.

A clean end publishes ``stopped/<rank>`` before the rank stops heart-beating, so a finished rank is never
taken for a lost one: explicitly (``stop()``, what ``megagopher.train`` does before destroying the
groups), or on its own once the default process group has been destroyed (``Trainer.close`` used as a
library). A process that exits with its groups still alive (an uncaught error) publishes nothing, so its
watcher names it.
"""
import atexit
import datetime
import os
import re
import socket
import threading
import time

import torch.distributed as dist

from megagopher.errors import EXIT_PEER_LOST

INTERVAL_S = 1.0
# A healthy rank must never look silent: with 8 ranks and a busy process on 2 cores the longest gap between
# two beats measured 1.2 s, and a long C call that holds the GIL can add seconds, hence at least 10 s.
# More than 60 s would let a hung rank hold the whole job for minutes.
MIN_THRESHOLD_S, MAX_THRESHOLD_S = 10.0, 60.0
# The signatures of a failed collective: c10d's own errors are DistError; gloo's transport raises a
# RuntimeError that names its source file or the peer's closed socket.
_COMM_ERROR = re.compile(r"gloo/transport|ProcessGroupGloo|Connection (closed|reset) by peer|Broken pipe")


def threshold_for(timeout_s):
    """Seconds without a heartbeat after which a rank is lost: the collective timeout, within [10, 60]."""
    return float(min(max(timeout_s, MIN_THRESHOLD_S), MAX_THRESHOLD_S))


def is_communication_error(error):
    return isinstance(error, dist.DistError) or bool(_COMM_ERROR.search(str(error)))


def _read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _pid_namespace():
    """(boot id, pid namespace): two processes with equal values see the same pids."""
    try:
        st = os.stat("/proc/self/ns/pid")
    except OSError:
        return None
    boot = _read("/proc/sys/kernel/random/boot_id")
    return f"{boot}:{st.st_dev}:{st.st_ino}" if boot else None


def _stat(pid):
    """(state, start time) of a process from /proc, or None when there is no such process."""
    text = _read(f"/proc/{pid}/stat")
    if text is None:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    return fields[0], fields[19]  # fields 3 and 22 of proc(5)


def process_identity():
    """What a peer needs to tell whether this very process still runs: "namespace pid start-time", or ""
    where /proc cannot answer (then only the heartbeat decides)."""
    namespace, stat = _pid_namespace(), _stat(os.getpid())
    return f"{namespace} {os.getpid()} {stat[1]}" if namespace and stat else ""


def process_gone(identity):
    """True when the process ``identity`` names has ended (a zombie counts); False when it runs or when
    this machine cannot tell (another node or pid namespace)."""
    parts = identity.split()
    if len(parts) != 3 or parts[0] != _pid_namespace():
        return False
    stat = _stat(parts[1])
    return stat is None or stat[0] in "ZXx" or stat[1] != parts[2]


def _hard_exit(line):
    os.write(2, (line + "\n").encode())  # one write: the line stays whole next to other ranks' output
    os._exit(EXIT_PEER_LOST)


class Watchdog:
    """One rank's heartbeat and watch over its neighbour (module docstring). ``store`` is a c10d store
    shared by every rank; ``connect`` opens a fresh connection to it after a failure; ``finished`` says
    whether this process has ended its communication (then the thread retires cleanly); ``on_verdict``
    receives the line to print, and by default prints it and hard-exits."""

    def __init__(self, store, rank, world_size, threshold_s, *, connect=None, launcher_pid=None,
                 finished=lambda: False, on_verdict=_hard_exit, interval_s=INTERVAL_S, where="the store"):
        self.store, self.rank, self.world_size = store, rank, world_size
        self.threshold_s, self.interval_s = threshold_s, interval_s
        self._connect, self._launcher_pid, self._finished = connect, launcher_pid, finished
        self._on_verdict, self._where = on_verdict, where
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="megagopher-watchdog", daemon=True)
        self._target, self._failing_since = None, None
        self.verdict = None

    def start(self):
        self.store.set(f"identity/{self.rank}", process_identity())
        self.store.add(f"beat/{self.rank}", 1)
        # An error that ends the interpreter skips the clean stop; the thread must still be gone before
        # the interpreter tears down the objects its store call uses.
        atexit.register(self._at_exit)
        self._thread.start()
        return self

    @property
    def running(self):
        return self._thread.is_alive()

    def stop(self):
        """The clean end of this rank: stop the thread, then tell the watchers this rank left on purpose.
        Calling it again does nothing."""
        if self.store is None:
            return
        self._halt.set()
        self._thread.join(timeout=self.threshold_s)
        self._publish_stopped()
        self.store = None  # the connection closes now, while the interpreter is whole
        atexit.unregister(self._at_exit)

    def _publish_stopped(self):
        if self.store is None:  # stop() has run already
            return
        try:
            self.store.set(f"stopped/{self.rank}", "1")
        except RuntimeError:  # the store is gone too; this rank is ending anyway
            pass

    def _at_exit(self):
        self._halt.set()
        self._thread.join(timeout=self.interval_s * 5)
        if self._finished():  # the groups were destroyed: the end was clean
            self._publish_stopped()

    def wait_for_verdict(self, timeout_s=None):
        """Blocks the calling thread until this rank is ended by a verdict (then it does not return), the
        thread stops, or ``timeout_s`` (default: threshold plus a few ticks) passes."""
        deadline = time.monotonic() + (self.threshold_s + 3 * self.interval_s if timeout_s is None else timeout_s)
        while self._thread.is_alive() and self.verdict is None and time.monotonic() < deadline:
            time.sleep(0.1)
        return self.verdict

    # -- the thread -------------------------------------------------------------------------------------
    def _loop(self):
        while not self._halt.wait(self.interval_s):
            if self._finished():
                self._publish_stopped()
                return
            if self._launcher_pid is not None and os.getppid() != self._launcher_pid:
                self._end(f"megagopher: the launcher (torchrun, pid {self._launcher_pid}) is gone; "
                          f"ending rank {self.rank}")
                return
            try:
                self._tick()
                self._failing_since = None
            except RuntimeError as e:  # c10d store errors are RuntimeErrors (DistError)
                if self._store_lost(e):
                    return
            if self.verdict is not None:
                return

    def _tick(self):
        store = self.store
        store.add(f"beat/{self.rank}", 1)
        if store.check(["dead"]):
            self._end(f"megagopher: {store.get('dead').decode()}; ending rank {self.rank}")
            return
        reason = self._judge_target()
        if reason is not None:
            lost = self._target["rank"]
            verdict = store.compare_set("dead", "", f"rank {lost} {reason}").decode()
            self._end(f"megagopher: {verdict}; ending rank {self.rank}")

    def _next_running(self):
        """The first rank after this one that has not ended cleanly; None when all of them have."""
        for k in range(1, self.world_size):
            other = (self.rank + k) % self.world_size
            if not self.store.check([f"stopped/{other}"]):
                return other
        return None

    def _judge_target(self):
        """Why the watched rank is lost ("is gone ...", "stopped responding ..."), or None while it lives."""
        store, now = self.store, time.monotonic()
        other = self._next_running()
        if other is None:
            return None
        t = self._target
        if t is None or t["rank"] != other:
            t = self._target = {"rank": other, "identity": "", "beat": None, "since": now, "ticks": 0}
        if not t["identity"] and store.check([f"identity/{other}"]):  # published when its watchdog starts
            t["identity"] = store.get(f"identity/{other}").decode()
        beat = store.add(f"beat/{other}", 0)
        if beat != t["beat"]:
            t.update(beat=beat, since=now, ticks=0)
        else:
            t["ticks"] += 1
        gone = process_gone(t["identity"]) if t["identity"] else False
        # Counting this thread's own ticks as well as time: when the whole machine stalls, the watcher
        # stalls too and must not blame the rank it could not watch. A rank that has not beaten yet is
        # still starting: its silence says nothing (a collective's timeout covers that stretch).
        silent = beat > 0 and t["ticks"] * self.interval_s >= self.threshold_s and now - t["since"] >= self.threshold_s
        if not (gone or silent) or store.check([f"stopped/{other}"]):  # it may have ended cleanly just now
            return None
        if gone:
            return "is gone (its process exited or was killed)"
        return f"stopped responding for {now - t['since']:.0f} s (its process is hung or its node is unreachable)"

    def _store_lost(self, error):
        """After a failed store call: reconnect, or end this rank when the store stays out of reach."""
        now = time.monotonic()
        self._failing_since = self._failing_since or now
        try:
            if self._connect is None:
                raise error
            self.store = self._connect()
            return False
        except (RuntimeError, ConnectionError) as e:
            if now - self._failing_since < self.threshold_s and not isinstance(e, ConnectionError):
                return False
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            self._end(f"megagopher: the rendezvous store at {self._where} is unreachable ({first}): the launcher "
                      f"or the rank that hosts it is gone; ending rank {self.rank}")
            return True

    def _end(self, line):
        self.verdict = line
        self._on_verdict(line)


def start_from_env(rank, world_size, threshold_s, finished, prefix):
    """The watchdog of a process started with the env:// variables (torchrun or by hand): its own client
    connection to MASTER_ADDR:MASTER_PORT, keys under ``prefix`` (distributed.round_prefix: the run id and
    restart count) so that a restarted job never reads an old round's verdict, heartbeats or stops."""
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    timeout = datetime.timedelta(seconds=threshold_s)

    def connect():
        try:
            # A plain connection first: refused at once when nothing listens, where the store's client
            # would retry for its whole timeout.
            socket.create_connection((host, port), timeout=threshold_s).close()
            client = dist.TCPStore(host, port, is_master=False, timeout=timeout, wait_for_workers=False)
        except (RuntimeError, OSError) as e:
            raise ConnectionError(str(e)) from e
        return dist.PrefixStore(prefix + "watchdog", client)

    under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ  # only torchrun promises to stay our parent
    return Watchdog(connect(), rank, world_size, threshold_s, connect=connect, finished=finished,
                    launcher_pid=os.getppid() if under_torchrun else None,
                    where=f"{host}:{port}").start()
