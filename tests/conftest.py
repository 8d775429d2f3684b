"""Test session setup: which tests run Triton's interpreter and which run compiled kernels on a GPU.

The kernel tests run the Triton code itself on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1,
set here before triton is first imported; under "auto" CPU tensors still take the PyTorch path). Triton reads
the variable when a kernel is defined, not when it is launched: ``triton.jit`` returns an interpreted or a
compiled function at the import of each kernel module (triton/runtime/jit.py), and kernels/_common.autotuned
picks its configuration list then too. So one process runs either interpreted or compiled kernels, never both.

Tests marked ``gpu`` (tests/test_kernels_cuda.py) need compiled kernels on a CUDA GPU:
- no CUDA GPU visible (torch.cuda.is_available() is False): skipped, the one skip the kernel tests allow;
- a GPU visible, and this session compiles (TRITON_INTERPRET=0 in the environment, as tools/gpu_check.sh
  sets): they run here;
- a GPU visible, and this session interprets (README's ``python -m pytest tests``): the first of them in a file
  runs the file's selected ones in one child pytest with TRITON_INTERPRET=0, and each then passes or fails with
  the outcome of its own run there (the child's report in the failure), so the CPU tests keep the interpreter
  and the GPU tests still run compiled under one command. (A child per file, because pytest-xdist gives each
  file to one worker: a child for the whole selection would run twice when two workers hold gpu tests.)
With a GPU visible a ``gpu`` test that skips (in this session or the child) fails instead: the compiled path
must run where it can.

The suite runs on pytest-xdist workers (pytest.ini: ``-n auto --dist loadfile``): many tests leave a core idle
(a subprocess starting Python and torch, the Triton interpreter on one core), and the other worker fills it.
Tests marked ``alone`` bound wall-clock times; under xdist they run while no other test runs
(tests/machine_share.py).
"""
import json
import os
import subprocess
import sys
import tempfile

import pytest

import machine_share

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPORT_ENV = "MEGAGOPHER_GPU_REPORT"  # set in the child: the file its gpu tests' outcomes are written to
_child = {"runs": {}}  # the selected gpu tests by file, and each file's child run: outcomes, exit status, output


def cuda_visible():
    import torch
    return torch.cuda.is_available()


def interpreted():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def gpu_mode():
    """What the ``gpu`` tests do in this session: "skip", "run" (here, compiled) or "child"."""
    if not cuda_visible():
        return "skip"
    return "child" if interpreted() else "run"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: compiled Triton kernels on a CUDA GPU (see tests/conftest.py)")
    config.addinivalue_line("markers", "alone: bounds wall-clock times; under xdist no other test runs meanwhile")
    machine_share.start(config)


def pytest_unconfigure(config):
    machine_share.finish(config)


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: a worker per core, at most 4, and one per 7 GiB available (two workers, each with its pools
    of 2, 4 and 8 ranks and its tests' own processes, peaked at 12.5 GiB in use on the 2-core CI machine)."""
    with open("/proc/meminfo") as f:
        available_gib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable")) / 2**20
    return max(1, min(os.cpu_count() or 1, 4, int(available_gib // 7)))


@pytest.fixture(autouse=True)
def _machine_share(request):
    with machine_share.hold(request.config, alone=request.node.get_closest_marker("alone") is not None):
        yield


@pytest.hookimpl(trylast=True)  # after -k and -m have deselected: the child runs what this session selected
def pytest_collection_modifyitems(config, items):
    mode = gpu_mode() if any(item.get_closest_marker("gpu") for item in items) else None
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("gpu") and mode == "skip":
            item.add_marker(skip)
    _child["selected"] = {}
    for item in items:
        if item.get_closest_marker("gpu"):
            _child["selected"].setdefault(item.nodeid.split("::")[0], []).append(item.nodeid)
    _child["root"] = str(config.rootpath)
    _child["no_xdist"] = ["-n", "0"] if config.pluginmanager.hasplugin("xdist") else []


def run_child(nodeids, root):
    """Runs ``nodeids`` in a child pytest compiling its kernels; returns ({node id: (outcome, report text)},
    the exit status, the output's tail)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "report.jsonl")
        env = dict(os.environ, TRITON_INTERPRET="0", **{REPORT_ENV: report})
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *_child["no_xdist"],
                              *nodeids], cwd=root, env=env, capture_output=True, text=True)
        outcomes = {}
        if os.path.exists(report):
            for line in open(report):
                row = json.loads(line)
                if row["outcome"] != "passed" or row["nodeid"] not in outcomes:  # a failed phase decides
                    outcomes[row["nodeid"]] = (row["outcome"], row["text"])
    return outcomes, out.returncode, (out.stdout + out.stderr)[-3000:]


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    if not pyfuncitem.get_closest_marker("gpu") or gpu_mode() != "child":
        return None
    path = pyfuncitem.nodeid.split("::")[0]
    if path not in _child["runs"]:
        _child["runs"][path] = run_child(_child["selected"][path], _child["root"])
    outcomes, returncode, tail = _child["runs"][path]
    outcome, text = outcomes.get(pyfuncitem.nodeid, (None, ""))
    if outcome is None:
        pytest.fail(f"did not run in the compiled child pytest (TRITON_INTERPRET=0; exit status "
                    f"{returncode}):\n{tail}", pytrace=False)
    if outcome != "passed":
        pytest.fail(f"{outcome} in the compiled child pytest (TRITON_INTERPRET=0):\n{text}", pytrace=False)
    return True


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A ``gpu`` test that skips while a GPU is visible fails; in the child, every phase's outcome is recorded."""
    outcome = yield
    report = outcome.get_result()
    if not item.get_closest_marker("gpu"):
        return
    if report.skipped and cuda_visible():
        report.outcome = "failed"
        report.longrepr = f"skipped although a CUDA GPU is visible (the compiled path must run): {report.longrepr}"
    if os.environ.get(REPORT_ENV):
        with open(os.environ[REPORT_ENV], "a") as f:
            f.write(json.dumps(dict(nodeid=report.nodeid, outcome=report.outcome, text=str(report.longrepr or "")))
                    + "\n")
