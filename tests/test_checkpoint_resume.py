"""Resuming through the real entry point where the first release could not: a ZeRO-1 checkpoint at another
data-parallel size (dp4 -> dp2 and dp2 -> dp4, with and without ZeRO-1 on the new side), an fp16 run's
loss scaler, a stage-boundary checkpoint whose next stage grows the model, and asynchronous saves (the
same checkpoints as synchronous ones; a crash in the background write leaves the previous one)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from megagopher.training.checkpoint import CheckpointReader
from test_reshard import GROWING  # 2 layers, then a stage that grows to 4
from train_utils import ROOT, TINY, read_metrics, run_train, write_config

NEXT_STEP_RTOL, STEP_AFTER_RTOL = 1e-5, 1e-4  # as in test_reshard.py: only the order of sums differs
LONG = TINY.replace("train_iters = 4", "train_iters = 6")


def _rows(run_dir):
    return {r["iteration"]: r for r in read_metrics(run_dir)}


def _assert_continues(resumed, original, iterations):
    assert sorted(resumed) == iterations
    first, *rest = iterations
    assert resumed[first]["loss"] == pytest.approx(original[first]["loss"], rel=NEXT_STEP_RTOL)
    for it in rest:
        assert resumed[it]["loss"] == pytest.approx(original[it]["loss"], rel=STEP_AFTER_RTOL), it


def test_zero1_checkpoint_resumes_at_another_dp(tmp_path):
    cfg = write_config(tmp_path, LONG)
    a, a_ckpt = str(tmp_path / "dp4"), str(tmp_path / "dp4_ckpt")
    run_train(cfg, a, "--optimizer.distributed=true", f"--checkpoint.dir={a_ckpt}", "--checkpoint.save_interval=2",
              nproc=4)
    # dp4 + ZeRO-1 -> dp2, with ZeRO-1 (which itself saves at 4) and without.
    b, b_ckpt = str(tmp_path / "dp2_zero"), str(tmp_path / "dp2_zero_ckpt")
    run_train(cfg, b, "--optimizer.distributed=true", f"--checkpoint.load={a_ckpt}/iter_0000002",
              f"--checkpoint.dir={b_ckpt}", "--checkpoint.save_interval=2", nproc=2)
    _assert_continues(_rows(b), _rows(a), [3, 4, 5, 6])
    c = str(tmp_path / "dp2_plain")
    run_train(cfg, c, f"--checkpoint.load={a_ckpt}/iter_0000002", nproc=2)
    _assert_continues(_rows(c), _rows(a), [3, 4, 5, 6])
    # dp2 + ZeRO-1 -> dp4, with and without ZeRO-1.
    for name, extra in (("dp4_zero", ("--optimizer.distributed=true",)), ("dp4_plain", ())):
        run_dir = str(tmp_path / name)
        run_train(cfg, run_dir, *extra, f"--checkpoint.load={b_ckpt}/iter_0000004", nproc=4)
        _assert_continues(_rows(run_dir), _rows(b), [5, 6])


def test_fp16_resume_restores_the_loss_scaler_exactly(tmp_path):
    """A small window makes the scale grow, and a huge initial scale makes it back off (hysteresis 2), so
    scale, growth tracker and hysteresis all matter for the steps after the resume."""
    cfg = write_config(tmp_path, TINY.replace("train_iters = 4", "train_iters = 8"))
    fp16 = ("--training.precision=fp16", "--training.loss_scale_window=2", "--training.hysteresis=2",
            "--training.initial_loss_scale=1e30")
    ref = str(tmp_path / "ref")
    run_train(cfg, ref, *fp16)
    run_dir, ckpt = str(tmp_path / "run"), str(tmp_path / "ckpt")
    run_train(cfg, run_dir, *fp16, f"--checkpoint.dir={ckpt}", "--training.exit_after_iters=3")
    scaler = json.load(open(os.path.join(ckpt, "iter_0000003", "metadata.json")))["optimizer_scalars"]["loss_scaler"]
    assert set(scaler) == {"scale", "growth_tracker", "hysteresis_tracker"}
    run_train(cfg, run_dir, *fp16, f"--checkpoint.dir={ckpt}", "--checkpoint.load=auto")
    keys = ("loss", "loss_scale", "skipped", "grad_norm")
    expected = [tuple(r[k] for k in keys) for r in read_metrics(ref)]
    assert [tuple(r[k] for k in keys) for r in read_metrics(run_dir)] == expected
    assert len({r["loss_scale"] for r in read_metrics(ref)}) > 2 and any(r["skipped"] for r in read_metrics(ref))



def test_resume_from_the_boundary_before_growth(tmp_path):
    """The bug: the stage-boundary checkpoint (optimizer state of the 2-layer model) was loaded into the
    grown 4-layer model: KeyError 'layers.2.input_norm.weight' on every rank. Resuming from it must grow
    and train on exactly as the uninterrupted run did (a grown model starts a fresh optimizer)."""
    cfg = write_config(tmp_path, GROWING)
    run_dir, ckpt = str(tmp_path / "run"), str(tmp_path / "ckpt")
    args = (f"--checkpoint.dir={ckpt}", "--checkpoint.load=auto", "--parallel.tp=2")
    run_train(cfg, run_dir, *args, nproc=2)
    reference = [(r["stage"], r["loss"], r["grad_norm"]) for r in read_metrics(run_dir)]
    assert sorted(os.listdir(ckpt)) == ["iter_0000002", "iter_0000004", "latest"]
    import shutil
    shutil.rmtree(os.path.join(ckpt, "iter_0000004"))  # the final checkpoint gone: resume at the boundary
    proc = run_train(cfg, run_dir, *args, nproc=2)
    assert "resumed from" in proc.stdout and "iter_0000002" in proc.stdout and "grew the model" in proc.stdout
    assert [(r["stage"], r["loss"], r["grad_norm"]) for r in read_metrics(run_dir)] == reference


def test_async_saves_write_the_same_checkpoints(tmp_path):
    cfg = write_config(tmp_path, LONG)
    runs = {}
    for mode in ("sync", "async"):
        ckpt = str(tmp_path / f"{mode}_ckpt")
        proc = run_train(cfg, str(tmp_path / mode), f"--checkpoint.dir={ckpt}", "--checkpoint.save_interval=2",
                         "--optimizer.distributed=true", "--model.dropout=0.1",
                         f"--checkpoint.async_save={str(mode == 'async').lower()}", nproc=2)
        assert proc.stdout.count("saved checkpoint") == 3, proc.stdout
        runs[mode] = (ckpt, [r["loss"] for r in read_metrics(str(tmp_path / mode))])
    assert runs["sync"][1] == runs["async"][1]
    for it in ("iter_0000002", "iter_0000004", "iter_0000006"):
        a, b = CheckpointReader(os.path.join(runs["sync"][0], it)), CheckpointReader(os.path.join(runs["async"][0], it))
        for name in a.names():
            for kind in ("param", "exp_avg", "exp_avg_sq"):
                assert torch.equal(a.full_tensor(name, kind), b.full_tensor(name, kind)), (it, name, kind)
        assert a.rng_tensors(1)["rng/cpu"].equal(b.rng_tensors(1)["rng/cpu"])


def test_crash_during_an_async_write_keeps_the_previous_checkpoint(tmp_path):
    cfg = write_config(tmp_path, LONG)
    ref = str(tmp_path / "ref")
    run_train(cfg, ref, "--model.dropout=0.1")
    run_dir, ckpt = str(tmp_path / "run"), str(tmp_path / "ckpt")
    args = ("--model.dropout=0.1", f"--checkpoint.dir={ckpt}", "--checkpoint.load=auto",
            "--checkpoint.save_interval=2", "--checkpoint.async_save=true")
    inject = os.path.join(ROOT, "tests", "fault_injection.py")
    proc = subprocess.run([sys.executable, inject, "kill-in-save", "4", "--config", cfg, f"--run.dir={run_dir}",
                           *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode < 0, proc.stderr  # killed by its own background writer
    assert sorted(os.listdir(ckpt)) == ["iter_0000002", "iter_0000004.tmp", "latest"]
    assert open(os.path.join(ckpt, "latest")).read().strip() == "2"
    run_train(cfg, run_dir, *args)
    assert [r["loss"] for r in read_metrics(run_dir)] == [r["loss"] for r in read_metrics(ref)]


ONE_STAGE = TINY.replace("train_iters = 4\n", "") + """
[[stages]]
name = "first"
train_iters = 2
"""
TWO_STAGES = ONE_STAGE + """
[[stages]]
name = "second"
train_iters = 2
optimizer.lr = 1e-3
"""


def test_extending_a_finished_run(tmp_path):
    """Rerunning a finished run with more steps continues from its last checkpoint (as Megatron's
    --train-iters does); with a stage added it trains that stage exactly as a run that had it from the
    start; with nothing left to do it says so in one line."""
    one, two = write_config(tmp_path, ONE_STAGE, "one.toml"), write_config(tmp_path, TWO_STAGES, "two.toml")
    reference = str(tmp_path / "reference")
    run_train(two, reference)
    run_dir = str(tmp_path / "run")
    args = (f"--checkpoint.dir={tmp_path / 'ckpt'}", "--checkpoint.load=auto")
    run_train(one, run_dir, *args)
    proc = run_train(two, run_dir, *args)  # a stage added
    assert "resumed from" in proc.stdout
    keys = ("iteration", "stage", "loss", "grad_norm")
    assert [[r[k] for k in keys] for r in read_metrics(run_dir)] == [[r[k] for k in keys] for r in read_metrics(reference)]
    proc = run_train(two, run_dir, *args, "--stages.second.train_iters=3")  # the last stage, longer
    assert [r["iteration"] for r in read_metrics(run_dir)] == [1, 2, 3, 4, 5]
    proc = run_train(two, run_dir, *args, "--stages.second.train_iters=3")
    lines = [line for line in proc.stdout.splitlines() if "nothing left to do" in line]
    assert len(lines) == 1 and "iteration 5" in lines[0], proc.stdout
    assert [r["iteration"] for r in read_metrics(run_dir)] == [1, 2, 3, 4, 5]


def test_resharded_resume_with_dropout_is_reproducible(tmp_path):
    """Under a new layout the ranks' random streams are derived from (seed, iteration): resuming the same
    checkpoint at another layout twice gives the same losses, dropout on."""
    cfg = write_config(tmp_path, LONG)
    ckpt = str(tmp_path / "ckpt")
    run_train(cfg, str(tmp_path / "dp2"), "--model.dropout=0.1", f"--checkpoint.dir={ckpt}",
              "--checkpoint.save_interval=2", nproc=2)
    runs = []
    for i in range(2):
        run_dir = str(tmp_path / f"serial{i}")
        run_train(cfg, run_dir, "--model.dropout=0.1", f"--checkpoint.load={ckpt}/iter_0000002")
        runs.append([(r["iteration"], r["loss"], r["grad_norm"]) for r in read_metrics(run_dir)])
    assert runs[0] == runs[1] and [r[0] for r in runs[0]] == [3, 4, 5, 6]
