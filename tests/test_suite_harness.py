"""tests/machine_share.py's sharing of the machine between pytest-xdist workers (pytest.ini runs the suite with
``-n auto --dist loadfile``), checked on a sample suite in a child pytest with two workers: an ``alone`` test
runs while no other test runs, the other tests still run side by side, and the lock folder goes with the
session."""
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

SAMPLE = '''
import os
import time


def record(name, seconds):
    start = time.time()
    time.sleep(seconds)
    with open(os.environ["SAMPLE_LOG"], "a") as f:
        f.write(f"{name} {start} {time.time()}\\n")
'''
ALONE = '''
import pytest
from sample import record


@pytest.mark.alone
@pytest.mark.parametrize("n", range(2))
def test_alone(n):
    record(f"alone{n}", 1.0)
'''
SHARED = '''
import pytest
from sample import record


@pytest.mark.parametrize("n", range(4))
def test_shared(n):
    record(f"{__name__}-{n}", 0.5)
'''


def test_alone_tests_run_by_themselves_and_the_rest_side_by_side(tmp_path):
    for helper in ("conftest.py", "machine_share.py"):
        shutil.copy(os.path.join(HERE, helper), tmp_path / helper)
    (tmp_path / "sample.py").write_text(SAMPLE)
    # In this order (no reordering): the first worker takes the alone file, the other a shared one, which waits;
    # then the two shared files run side by side.
    (tmp_path / "test_a.py").write_text(ALONE)
    (tmp_path / "test_b.py").write_text(SHARED)
    (tmp_path / "test_c.py").write_text(SHARED)
    log, tmp = tmp_path / "intervals.txt", tmp_path / "tmp"
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "MEGAGOPHER_"))}
    env.update(PYTHONPATH=str(tmp_path), SAMPLE_LOG=str(log), TMPDIR=str(tmp))
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2", "--dist",
                          "loadfile", "--no-loadscope-reorder", "test_a.py", "test_b.py", "test_c.py"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "10 passed" in out.stdout, out.stdout + out.stderr
    intervals = {name: (float(start), float(end)) for name, start, end in (line.split() for line in open(log))}

    def overlap(a, b):
        return intervals[a][0] < intervals[b][1] and intervals[b][0] < intervals[a][1]

    alone = [name for name in intervals if name.startswith("alone")]
    shared = [name for name in intervals if name.startswith("test_")]
    assert len(alone) == 2 and len(shared) == 8, intervals
    for name in alone:
        assert not any(overlap(name, other) for other in intervals if other != name), (name, intervals)
    assert any(overlap(b, c) for b in shared if b.startswith("test_b") for c in shared if c.startswith("test_c")), \
        intervals
    assert not [name for name in os.listdir(tmp) if name.startswith("megagopher-tests-")]  # the locks' folder went
