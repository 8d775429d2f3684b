"""Checkpoints through the real entry point: exact resume after SIGKILL (also mid-save and across a stage
boundary), SIGTERM, a corrupt file falling back to the previous checkpoint, and non-finite losses."""
import json
import os
import random
import signal
import subprocess
import sys
import time

from megagopher.testing import free_port
from train_utils import ROOT, TINY, kill_job, read_metrics, run_train, write_config

STAGED = TINY.replace("train_iters = 4\n", "") + """
[checkpoint]
save_interval = 1
keep_last = 3
[[stages]]
name = "general"
train_iters = 3
[[stages]]
name = "math"
train_iters = 3
optimizer.lr = 1e-3
model.seq_length = 8
"""


def _losses(run_dir):
    return [(r["iteration"], r["stage"], r["loss"], r["grad_norm"]) for r in read_metrics(run_dir)]


# Four ranks (tp2 x dp2 with sequence parallelism) and dropout: a bit-exact resume needs every rank's
# random streams (CPU and the model-parallel tracker) restored, not just the weights.
LAYOUT = ("--parallel.tp=2", "--parallel.sp=true", "--model.dropout=0.1")


def _run_until(cmd, run_dir, target, timeout=240):
    """Starts ``cmd`` in its own session; SIGKILLs the whole job (launcher and workers) once metrics.jsonl
    reaches iteration ``target``."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=env)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        rows = read_metrics(run_dir) if os.path.exists(os.path.join(run_dir, "metrics.jsonl")) else []
        if rows and rows[-1]["iteration"] >= target:
            break
        time.sleep(0.05)
    kill_job(proc)
    return proc


def test_resume_after_sigkill_is_bitwise_exact(tmp_path):
    cfg = write_config(tmp_path, STAGED)
    ref_dir = str(tmp_path / "ref")
    run_train(cfg, ref_dir, *LAYOUT, f"--checkpoint.dir={tmp_path / 'ref_ckpt'}", nproc=4)
    reference = _losses(ref_dir)
    assert [r[0] for r in reference] == list(range(1, 7)) and {r[1] for r in reference} == {"general", "math"}

    run_dir, ckpt_dir = str(tmp_path / "run"), str(tmp_path / "ckpt")
    args = (*LAYOUT, f"--checkpoint.dir={ckpt_dir}", "--checkpoint.load=auto")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=4", f"--master-port={free_port()}"]
    # 1) every rank killed right after writing its file of iteration 2's checkpoint: iter_0000002 must not appear.
    inject = os.path.join(ROOT, "tests", "fault_injection.py")
    proc = subprocess.run([*torchrun, inject, "kill-in-save", "2", "--config", cfg, f"--run.dir={run_dir}", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode != 0
    assert sorted(os.listdir(ckpt_dir)) == ["iter_0000001", "iter_0000002.tmp", "latest"]
    # 2) the whole job SIGKILLed at a random point after that (the stage boundary is at iteration 3).
    target = random.Random().randint(3, 5)
    cmd = [*torchrun[:-1], f"--master-port={free_port()}", "-m", "megagopher.train", "--config", cfg,
           f"--run.dir={run_dir}", *args]
    _run_until(cmd, run_dir, target)
    # 3) the same command again finishes the run.
    run_train(cfg, run_dir, *args, nproc=4)
    assert _losses(run_dir) == reference, f"killed near iteration {target}"


def test_sigterm_saves_and_resume_continues(tmp_path):
    long_first_stage = STAGED.replace("save_interval = 1", "save_interval = 0").replace(
        'name = "general"\ntrain_iters = 3', 'name = "general"\ntrain_iters = 40')
    cfg = write_config(tmp_path, long_first_stage)
    run_dir, ckpt_dir = str(tmp_path / "run"), str(tmp_path / "ckpt")
    cmd = [sys.executable, "-m", "megagopher.train", "--config", cfg, f"--run.dir={run_dir}",
           f"--checkpoint.dir={ckpt_dir}", "--checkpoint.load=auto"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline:
        if os.path.exists(os.path.join(run_dir, "metrics.jsonl")) and read_metrics(run_dir):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    stopped_at = read_metrics(run_dir)[-1]["iteration"]
    assert "got SIGTERM; stopping after this step" in out and "saved checkpoint" in out
    with open(os.path.join(ckpt_dir, "latest")) as f:
        assert int(f.read()) == stopped_at
    run_train(cfg, run_dir, f"--checkpoint.dir={ckpt_dir}", "--checkpoint.load=auto")
    assert [r["iteration"] for r in read_metrics(run_dir)] == list(range(1, 44))


def test_corrupt_checkpoint_falls_back_to_previous(tmp_path):
    cfg = write_config(tmp_path, STAGED)
    run_dir, ckpt_dir = str(tmp_path / "run"), str(tmp_path / "ckpt")
    run_train(cfg, run_dir, f"--checkpoint.dir={ckpt_dir}", "--training.exit_after_iters=2")
    newest = os.path.join(ckpt_dir, "iter_0000002", "rank_00000.safetensors")
    with open(newest, "r+b") as f:
        f.seek(os.path.getsize(newest) // 2)
        f.write(b"\x00corrupt\x00")
    proc = run_train(cfg, run_dir, f"--checkpoint.dir={ckpt_dir}", "--checkpoint.load=auto")
    assert "checksum mismatch" in proc.stdout and "iter_0000002" in proc.stdout
    assert "resumed from" in proc.stdout and "iter_0000001" in proc.stdout
    assert [r["iteration"] for r in read_metrics(run_dir)] == list(range(1, 7))


def test_non_finite_loss_stops_or_skips(tmp_path):
    cfg = write_config(tmp_path)
    proc = run_train(cfg, str(tmp_path / "stop"), "--optimizer.lr=1e30", "--optimizer.clip_grad=0.0",
                     "--training.train_iters=6", check=False)
    assert proc.returncode != 0
    assert "non-finite loss" in proc.stderr and "on rank(s) [0]" in proc.stderr
    run_train(cfg, str(tmp_path / "skip"), "--optimizer.lr=1e30", "--optimizer.clip_grad=0.0",
              "--training.train_iters=6", "--training.nan_policy=skip")
    rows = read_metrics(str(tmp_path / "skip"))
    assert len(rows) == 6 and any(r["skipped"] for r in rows)
