"""In-job recovery under ``torchrun --max-restarts`` (training/distributed.py ``round_store``): a worker that
dies mid-run makes torchrun's agent stop and restart the whole group, every worker with the restart count one
higher; the restarted job must meet again on the agent's store (whose earlier round's keys are still there),
resume from its newest checkpoint by itself, and end as an uninterrupted run ends: exit status 0 and the
same losses, step for step (the same layout restores every rank's random streams, so dropout included)."""
import os
import subprocess
import sys

import pytest

from megagopher.testing import free_port
from train_utils import ROOT, TINY, read_metrics, run_train, write_config

SIX_STEPS = TINY.replace("train_iters = 4", "train_iters = 6")
# A short collective timeout: a restarted round that cannot meet fails within it instead of the default 600 s.
ARGS = ("--model.dropout=0.1", "--checkpoint.load=auto", "--checkpoint.save_interval=2", "--parallel.timeout_s=30")


@pytest.mark.alone  # the restarted rounds must meet within the 30 s timeout: no other test runs meanwhile
def test_killed_workers_are_restarted_and_the_run_ends_as_an_uninterrupted_one(tmp_path):
    """Two failures, two restarts (the whole budget of --max-restarts=2): rank 1 dies at step 3 of the first
    round (the newest checkpoint is iteration 2), rank 0 at step 5 of the second (iteration 4)."""
    cfg = write_config(tmp_path, SIX_STEPS)
    ref = str(tmp_path / "ref")
    run_train(cfg, ref, *ARGS, f"--checkpoint.dir={tmp_path / 'ref_ckpt'}", nproc=2)
    run_dir, ckpt = str(tmp_path / "run"), str(tmp_path / "ckpt")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--max-restarts=2",
           f"--master-port={free_port()}", os.path.join(ROOT, "tests", "fault_injection.py"),
           "exit-at", "3", "1", "0", "5", "0", "1",
           "--config", cfg, f"--run.dir={run_dir}", f"--checkpoint.dir={ckpt}", *ARGS]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=420, env=env, cwd=ROOT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "connectFullMesh" not in out, out[-6000:]
    for iteration in (2, 4):  # each restarted round resumed from the newest checkpoint of the one before
        assert f"resumed from {ckpt}/iter_{iteration:07d}" in proc.stdout, out[-6000:]
    expected = [(r["iteration"], r["loss"], r["grad_norm"]) for r in read_metrics(ref)]
    assert [r[0] for r in expected] == [1, 2, 3, 4, 5, 6]
    assert [(r["iteration"], r["loss"], r["grad_norm"]) for r in read_metrics(run_dir)] == expected
