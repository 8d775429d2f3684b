"""The harness of the kernel tests, checked without a GPU.

tests/conftest.py's rule for the ``gpu`` tests: a plugin stands in for torch (its torch.cuda.is_available() says
what the test sets), and a sample test file for tests/test_kernels_cuda.py. Under README's command (an
interpreted session) with a GPU visible, each ``gpu`` test runs in one compiled child pytest (TRITON_INTERPRET=0)
and passes or fails with its outcome there, while the unmarked tests stay in the interpreted session; a skip with
a GPU visible is a failure, and so is a GPU that the child cannot use.

kernels/testing.py's FlashAttention-2 criterion: capped by the elementwise tolerance, so that neither a wrong
PyTorch baseline nor a wrong reference loosens it.
"""
import os
import re
import shutil
import subprocess
import sys

import torch

from megagopher.kernels.testing import compare_to_torch

HERE = os.path.dirname(os.path.abspath(__file__))

SAMPLE = '''
import os
import pytest


@pytest.mark.gpu
def test_compiled():
    assert os.environ["TRITON_INTERPRET"] == "0" and os.environ.get("MEGAGOPHER_GPU_REPORT")  # in the child


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 2])
def test_compiled_param(n):
    assert os.environ["TRITON_INTERPRET"] == "0"


@pytest.mark.gpu
def test_wrong_result():
    assert 1 + 1 == 3, "the kernel's output differs from the reference"


@pytest.mark.gpu
def test_skips_itself():
    pytest.skip("no Hopper here")


def test_cpu_interpreted():
    assert os.environ["TRITON_INTERPRET"] == "1" and not os.environ.get("MEGAGOPHER_GPU_REPORT")
'''
# A stub torch, loaded by every pytest of the test (parent and child alike, through PYTEST_ADDOPTS) before the
# conftest imports torch. FAKE_GPU: "everywhere", "session" (the interpreted session only: its compiled child,
# which has MEGAGOPHER_GPU_REPORT set, sees none) or unset (no GPU).
FAKE_TORCH = """
import os, sys, types


def is_available():
    where = os.environ.get("FAKE_GPU")
    return where == "everywhere" or (where == "session" and not os.environ.get("MEGAGOPHER_GPU_REPORT"))


sys.modules["torch"] = types.SimpleNamespace(cuda=types.SimpleNamespace(is_available=is_available))
"""


def _session(tmp_path, fake_gpu=None):
    for helper in ("conftest.py", "machine_share.py"):
        shutil.copy(os.path.join(HERE, helper), tmp_path / helper)
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    (tmp_path / "fake_torch.py").write_text(FAKE_TORCH)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MEGAGOPHER_GPU_REPORT", "FAKE_GPU")}
    env.update(PYTHONPATH=str(tmp_path), PYTEST_ADDOPTS="-p fake_torch", **({"FAKE_GPU": fake_gpu} if fake_gpu else {}))
    out = subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "test_sample.py"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    found = re.findall(r"^test_sample\.py::(\S+) (PASSED|FAILED|SKIPPED|ERROR)", out.stdout, re.M)
    return dict(found), out.stdout + out.stderr


def test_gpu_tests_run_compiled_in_a_child_of_an_interpreted_session(tmp_path):
    outcomes, log = _session(tmp_path, "everywhere")  # a GPU in the session and in its child
    assert outcomes == {"test_compiled": "PASSED", "test_compiled_param[1]": "PASSED",
                        "test_compiled_param[2]": "PASSED", "test_wrong_result": "FAILED",
                        "test_skips_itself": "FAILED", "test_cpu_interpreted": "PASSED"}, log
    assert "the kernel's output differs from the reference" in log, log  # the child's report, passed on
    assert "skipped although a CUDA GPU is visible" in log, log


def test_a_gpu_the_child_cannot_use_fails_and_none_skips(tmp_path):
    # torch sees a GPU in the session but not in the compiled child: every gpu test fails, none skips
    outcomes, log = _session(tmp_path, "session")
    assert outcomes == {"test_compiled": "FAILED", "test_compiled_param[1]": "FAILED",
                        "test_compiled_param[2]": "FAILED", "test_wrong_result": "FAILED",
                        "test_skips_itself": "FAILED", "test_cpu_interpreted": "PASSED"}, log
    assert "skipped in the compiled child pytest" in log, log
    # without a GPU the gpu tests skip: the one skip allowed
    outcomes, log = _session(tmp_path)
    assert outcomes == {"test_compiled": "SKIPPED", "test_compiled_param[1]": "SKIPPED",
                        "test_compiled_param[2]": "SKIPPED", "test_wrong_result": "SKIPPED",
                        "test_skips_itself": "SKIPPED", "test_cpu_interpreted": "PASSED"}, log


def _exp_case(ours, baseline, reference):
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    return compare_to_torch(ours, baseline, reference, (x,), (0,), tol=(4e-2, 2e-2))  # bf16's tolerance


def test_fa2_bound_is_capped_by_the_elementwise_tolerance():
    exp = torch.exp
    assert all(c.ok for c in _exp_case(exp, exp, exp))
    # a wrong reference that kernel and baseline miss alike: within FA2's bound (twice PyTorch's error), not the cap
    wrong_ref = _exp_case(exp, exp, lambda x: 1.1 * x.exp())
    assert all(c.err <= c.bound and not c.ok for c in wrong_ref), wrong_ref
    assert "over the elementwise tolerance" in str(wrong_ref[0])
    # a wrong baseline makes the bound loose enough for a wrong kernel; the cap still catches it
    wrong_both = _exp_case(lambda x: 1.05 * x.exp(), lambda x: (1.1 * x).exp(), exp)
    assert all(c.err <= c.bound and not c.ok for c in wrong_both), wrong_both
