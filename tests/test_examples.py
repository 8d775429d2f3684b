"""The examples users run first: tensor-parallel layers in a model of one's own."""
import os
import subprocess
import sys

from megagopher.testing import free_port
from train_utils import ROOT


def test_tp_in_your_model_matches_serial():
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                           f"--master-port={free_port()}", "examples/tp_in_your_model.py"],
                          cwd=ROOT, capture_output=True, text=True, timeout=180,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("max |loss difference| = ")
    assert float(last.split("= ")[1]) < 1e-5
    assert proc.stdout.count("tensor-parallel (tp=2)") == 5
