"""Sharing the machine between the suite's pytest-xdist workers (pytest.ini runs one per core; tests/conftest.py
sets this up): tests marked ``alone`` bound wall-clock times (a lost rank named within seconds, ranks that meet
within a 20 s ``parallel.timeout_s``, a sandboxed program's limit), so they run while no other test runs.

A readers-writer lock on files in a folder the controller makes and its workers inherit (LOCK_DIR_ENV): each
test holds it shared, an ``alone`` test exclusively. A gate taken first makes the writer win: while an
``alone`` test waits, no other test starts (shared flocks alone would let the other worker's back-to-back
tests starve it). Only xdist workers take it: not ``-n 0``, and not a pytest that a test starts, which
inherits the variables.
"""
import contextlib
import fcntl
import os
import shutil
import tempfile

LOCK_DIR_ENV = "MEGAGOPHER_TEST_LOCKS"  # set by the xdist controller: the folder of its workers' shared locks


def is_controller(config):
    """The process that hands files to xdist workers (and runs no test itself); xdist's own test for it."""
    return getattr(config.option, "dist", "no") != "no" and not hasattr(config, "workerinput")


def start(config):
    """In the controller, before the workers start (they inherit the variable): the lock folder."""
    if is_controller(config):
        os.environ[LOCK_DIR_ENV] = tempfile.mkdtemp(prefix="megagopher-tests-")


def finish(config):
    if is_controller(config) and LOCK_DIR_ENV in os.environ:
        shutil.rmtree(os.environ.pop(LOCK_DIR_ENV), ignore_errors=True)


@contextlib.contextmanager
def hold(config, alone):
    """Held around each test in an xdist worker: shared, or exclusive for an ``alone`` test."""
    folder = os.environ.get(LOCK_DIR_ENV)
    if folder is None or not hasattr(config, "workerinput"):
        yield
        return
    with open(os.path.join(folder, "gate"), "a") as gate, open(os.path.join(folder, "tests"), "a") as tests:
        fcntl.flock(gate, fcntl.LOCK_EX)
        fcntl.flock(tests, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        if not alone:
            fcntl.flock(gate, fcntl.LOCK_UN)
        yield  # closing the files releases both locks
