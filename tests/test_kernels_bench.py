"""tools/bench_kernels.py: --help answers at once (no torch/triton import); without a GPU (or with
--interpreter-check) it re-runs itself under the Triton interpreter and prints, and writes as JSON, the
correctness table."""
import json
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "tools", "bench_kernels.py")


def test_help_is_quick():
    out = subprocess.run([sys.executable, BENCH, "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "--kernel" in out.stdout and "--json" in out.stdout


def test_interpreter_check_reexecs_and_writes_the_table(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # it must set it itself
    table = tmp_path / "table.json"
    out = subprocess.run([sys.executable, BENCH, "--kernel", "swiglu", "--dtype", "fp32", "--json", str(table),
                          "--interpreter-check"], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Re-running under the Triton interpreter" in out.stdout and "0 failed" in out.stdout
    assert ("No CUDA GPU" in out.stdout) != torch.cuda.is_available()
    rows = json.loads(table.read_text())
    assert {r["check"] for r in rows} == {"fwd out", "bwd gate", "bwd up"}
    assert all(r["result"] == "pass" and r["kernel"] == "swiglu" for r in rows)
