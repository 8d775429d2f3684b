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


def test_deepseek_tiny_cpu_at_tp2_ep2_pp2_matches_serial(tmp_path):
    """examples/configs/deepseek_tiny_cpu.toml (MLA, DeepSeek-V3 routing, MTP) as configured, tp 2 x ep 2 x pp 2
    on 8 ranks, for 3 steps: its LM and MTP losses and gradient norms are the serial run's to fp32 rounding."""
    from train_utils import read_metrics, run_train
    config = os.path.join(ROOT, "examples", "configs", "deepseek_tiny_cpu.toml")
    steps = ("--training.train_iters=3", "--training.log_interval=1")
    run_train(config, str(tmp_path / "layout"), *steps, nproc=8)
    run_train(config, str(tmp_path / "serial"), *steps, "--parallel.tp=1", "--parallel.pp=1", "--parallel.ep=1",
              "--parallel.sp=false")
    layout, serial = read_metrics(str(tmp_path / "layout")), read_metrics(str(tmp_path / "serial"))
    assert len(layout) == len(serial) == 3
    for a, b in zip(layout, serial):
        for x, y in [(a["loss"], b["loss"]), (a["grad_norm"], b["grad_norm"]), *zip(a["mtp_loss"], b["mtp_loss"])]:
            assert abs(x - y) <= 1e-5 * abs(y), (a, b)
    assert layout[-1]["loss"] < layout[0]["loss"]
