"""The real entry point: pipeline layouts train as the serial run does.

The trainer's entry point (``megagopher.train.main``, on pooled ranks) on the tiny example config
(synthetic data, fp32, dropout off) for a few steps under (tp, pp) = (1, 1), (1, 2) and (1, 4) with vpp = 2
and the interleaved schedule, and (2, 2) with zb-h1; metrics.jsonl must agree to rounding (loss, and
grad_norm), and so must what the checkpoints hold: step 1's per-parameter gradients (exp_avg, clipping off)
and the weights and Adam moments after the last step. The interleaved run also writes the pipeline trace,
which the plot tool renders and the bubble function reads.
"""
import json
import os
import subprocess
import sys

import pytest

from megagopher.pipeline_parallel.trace import bubble_fractions, load_events
from train_utils import GOLDEN, GRAD_RTOL, STATE_RTOL, assert_same_training_state, run_train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "examples", "configs", "tiny.toml")
COMMON = ["--training.train_iters=3", "--model.num_layers=8", "--model.seq_length=32",
          "--training.global_batch_size=8", "--training.micro_batch_size=2", "--run.tensorboard=false",
          "--training.log_interval=1", "--checkpoint.save_interval=1", *GOLDEN]


def _train(run_dir, nproc, *overrides):
    # On the pooled ranks (train_utils.run_train): the trainer's own entry point, main(argv), without an
    # interpreter start per rank; tests/test_worker_pool.py shows a pooled run equals a torchrun launch.
    run_train(CONFIG, str(run_dir), f"--checkpoint.dir={run_dir}/ckpt", *COMMON, *overrides, nproc=nproc)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if "event" not in json.loads(line)]


def test_pipeline_layouts_log_the_serial_losses(tmp_path):
    serial = _train(tmp_path / "serial", 1)
    assert [m["iteration"] for m in serial] == [1, 2, 3]
    layouts = {
        "tp1 pp2 vpp2 interleaved": (2, ["--parallel.pp=2", "--parallel.vpp=2", "--parallel.schedule=interleaved"]),
        "tp1 pp4 vpp2 interleaved": (4, ["--parallel.pp=4", "--parallel.vpp=2", "--parallel.schedule=interleaved",
                                         "--parallel.trace=true"]),
        "tp2 pp2 zb-h1": (4, ["--parallel.tp=2", "--parallel.pp=2", "--parallel.schedule=zb-h1"]),
    }
    for name, (nproc, overrides) in layouts.items():
        metrics = _train(tmp_path / name.replace(" ", "_"), nproc, *overrides)
        assert len(metrics) == len(serial), name
        for got, want in zip(metrics, serial):
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-5), (name, got, want)
            assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4), (name, got, want)
        ckpt, serial_ckpt = tmp_path / name.replace(" ", "_") / "ckpt", tmp_path / "serial" / "ckpt"
        assert_same_training_state(ckpt, serial_ckpt, 1, GRAD_RTOL, kinds=("exp_avg",), what=name)
        assert_same_training_state(ckpt, serial_ckpt, 3, STATE_RTOL, kinds=("param", "exp_avg", "exp_avg_sq"),
                                   what=name)

    trace = tmp_path / "tp1_pp4_vpp2_interleaved" / "pipeline_trace.json"
    events = load_events(str(trace))
    assert {e["rank"] for e in events} == {0, 1, 2, 3}
    assert {e["chunk"] for e in events} == {0, 1} and {e["step"] for e in events} == {1, 2, 3}
    # Per step: global batch 8 / micro-batch 2 = 4 micro-batches x 2 chunks x (F, B) on every rank.
    assert sum(e["step"] == 3 and e["rank"] == 0 for e in events) == 4 * 2 * 2
    fractions = bubble_fractions(events, steps={2, 3})
    assert all(0.0 <= f < 1.0 for f in fractions.values())
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "plot_pipeline.py"), str(trace), "-o",
                          str(tmp_path / "timeline.png")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and (tmp_path / "timeline.png").stat().st_size > 0, out.stderr
