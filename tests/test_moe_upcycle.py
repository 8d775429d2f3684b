"""Sparse upcycling as a stage step (``grow.num_experts``), end to end through ``megagopher.train``: the first
loss after upcycling equals the loss the dense model logs on that step without it (serially, under tp2 x pp2
with sequence parallelism and under tp2 x ep2, combined with depth growth), and the MoE metrics (aux loss,
router z-loss, load, tokens per expert) reach metrics.jsonl from every pipeline stage; a checkpoint saved
under expert parallelism loads under another ep; cp2 x ep2 trains as the serial run does.
"""
import json
import math
import os

import pytest

from megagopher.config import load_config
from megagopher.training.checkpoint import CheckpointReader
from megagopher.training.ckpt_load import ModelMismatch, check_model_matches
from train_utils import TINY, read_metrics, run_train, write_config

BASE = TINY.replace("num_layers = 4", "num_layers = 2").replace("train_iters = 4\n", "").replace(
    "make_vocab_size_divisible_by = 8",
    "make_vocab_size_divisible_by = 8\nmoe_aux_loss_coeff = 0.01\nmoe_z_loss_coeff = 0.001")
STAGES = """
[[stages]]
name = "dense"
train_iters = 1
[[stages]]
name = "grown"
train_iters = 1
grow.num_layers = 4
"""
UPCYCLED = BASE + STAGES + "grow.num_experts = 4\n"
DENSE = BASE + STAGES
TOKENS_PER_STEP = 8 * 16  # global batch x sequence


def test_first_loss_after_upcycling_equals_the_dense_models(tmp_path):
    runs = {}
    for name, text, nproc, layout in (("dense", DENSE, 1, ()), ("upcycled", UPCYCLED, 1, ()),
                                      ("upcycled 3d", UPCYCLED, 4, ("--parallel.tp=2", "--parallel.pp=2",
                                                                    "--parallel.sp=true")),
                                      ("upcycled ep", UPCYCLED, 4, ("--parallel.tp=2", "--parallel.ep=2",
                                                                    "--parallel.sp=true"))):
        run_dir = tmp_path / name.replace(" ", "_")
        proc = run_train(write_config(tmp_path, text, name.replace(" ", "_") + ".toml"), str(run_dir), *layout,
                         nproc=nproc)
        if text is UPCYCLED:
            assert "upcycled the dense MLPs into 4 experts" in proc.stdout and "moe aux" in proc.stdout
        runs[name] = read_metrics(str(run_dir))
    dense, serial, parallel, expert = runs["dense"], runs["upcycled"], runs["upcycled 3d"], runs["upcycled ep"]
    assert [r["stage"] for r in serial] == ["dense", "grown"]
    assert serial[1]["loss"] == pytest.approx(dense[1]["loss"], rel=1e-6)
    assert parallel[1]["loss"] == pytest.approx(dense[1]["loss"], rel=1e-5)
    assert expert[1]["loss"] == pytest.approx(dense[1]["loss"], rel=1e-5)
    assert "moe_aux_loss" not in serial[0] and "moe_aux_loss" not in dense[1]
    for rows in (serial, parallel, expert):
        first = rows[1]
        # Every layer of the 4 is MoE (moe_layer_freq 1), top-2: 4 * 2 assignments per token of the step,
        # from both pipeline stages and every data-parallel replica.
        assert sum(first["moe_tokens_per_expert"]) == 4 * 2 * TOKENS_PER_STEP
        assert first["moe_load_max_over_mean"] >= 1.0 and first["moe_dropped"] == 0
        assert 0.0 < first["moe_aux_loss"] and 0.0 < first["moe_z_loss"]
    for rows in (parallel, expert):
        for key in ("moe_aux_loss", "moe_z_loss", "moe_load_max_over_mean"):
            assert math.isclose(rows[1][key], serial[1][key], rel_tol=1e-5), key
        assert rows[1]["moe_tokens_per_expert"] == serial[1]["moe_tokens_per_expert"]



MOE = TINY.replace("num_layers = 4", "num_layers = 2\nnum_experts = 4\nmoe_top_k = 2\nmoe_aux_loss_coeff = 0.01")


def test_expert_parallel_checkpoint_reshards_across_ep(tmp_path):
    """A checkpoint saved under ep2 x expert-DP 2 with ZeRO-1 (each rank writes its experts' shard) loads
    under ep4 and serially; the next steps log the losses the original run logs (tests/test_reshard.py's
    tolerances: bitwise the saved state, only the order of sums differs)."""
    cfg = write_config(tmp_path, MOE)
    original, ckpt = str(tmp_path / "original"), str(tmp_path / "ckpt")
    run_train(cfg, original, "--parallel.ep=2", "--optimizer.distributed=true", f"--checkpoint.dir={ckpt}",
              "--checkpoint.save_interval=2", nproc=4)
    with open(os.path.join(ckpt, "iter_0000002", "metadata.json")) as f:
        assert json.load(f)["layout"]["ep"] == 2
    expected = {r["iteration"]: r["loss"] for r in read_metrics(original)}
    assert sorted(expected) == [1, 2, 3, 4]
    for name, nproc, layout in (("ep4", 4, ("--parallel.ep=4",)), ("serial", 1, ())):
        run_dir = str(tmp_path / name)
        proc = run_train(cfg, run_dir, *layout, f"--checkpoint.load={ckpt}/iter_0000002",
                         f"--checkpoint.dir={tmp_path / (name + '_ckpt')}", nproc=nproc)
        assert "resumed from" in proc.stdout
        rows = {r["iteration"]: r["loss"] for r in read_metrics(run_dir)}
        assert sorted(rows) == [3, 4], name
        assert rows[3] == pytest.approx(expected[3], rel=1e-5), name
        assert rows[4] == pytest.approx(expected[4], rel=1e-4), name
    # The run's MoE architecture must be the checkpoint's: a clear error naming the key, before any step.
    reader = CheckpointReader(os.path.join(ckpt, "iter_0000002"))
    for key, value, named in (("num_experts", 8, "holds a model with 4 experts"), ("moe_top_k", 1, "moe_top_k = 1"),
                              ("moe_router", "sigmoid", "moe_router = 'sigmoid'")):
        run_cfg = load_config(cfg, {f"model.{key}": value})
        with pytest.raises(ModelMismatch, match=named):
            check_model_matches(reader, run_cfg, run_cfg.model.vocab_size)
    check_model_matches(reader, load_config(cfg), 90)


def test_context_and_expert_parallel_training_logs_the_serial_losses(tmp_path):
    """cp2 x ep2 with ZeRO-1 (4 ranks): the ranks of an expert-parallel group share a CP rank, so each CP
    chunk's tokens reach the experts by its own all-to-all, and the experts' gradients sum over expert DP x
    CP; every step's loss is the serial run's."""
    cfg = write_config(tmp_path, MOE.replace("moe_aux_loss_coeff", 'core_attention = "flash"\nmoe_aux_loss_coeff'))
    losses = {}
    for name, nproc, layout in (("serial", 1, ()), ("cp2 ep2", 4, ("--parallel.cp=2", "--parallel.ep=2",
                                                                    "--optimizer.distributed=true"))):
        run_dir = str(tmp_path / name.replace(" ", "_"))
        run_train(cfg, run_dir, *layout, nproc=nproc)
        losses[name] = [r["loss"] for r in read_metrics(run_dir)]
    assert len(losses["serial"]) == 4
    assert losses["cp2 ep2"] == pytest.approx(losses["serial"], rel=1e-5)
