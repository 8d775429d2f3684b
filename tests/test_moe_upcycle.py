"""Sparse upcycling as a stage step (``grow.num_experts``), end to end through ``megagopher.train``: the first
loss after upcycling equals the loss the dense model logs on that step without it (serially and under
tp2 x pp2 with sequence parallelism, combined with depth growth), and the MoE metrics (aux loss, router
z-loss, load, tokens per expert) reach metrics.jsonl from every pipeline stage.
"""
import math

import pytest

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
                                                                    "--parallel.sp=true"))):
        run_dir = tmp_path / name.replace(" ", "_")
        proc = run_train(write_config(tmp_path, text, name.replace(" ", "_") + ".toml"), str(run_dir), *layout,
                         nproc=nproc)
        if text is UPCYCLED:
            assert "upcycled the dense MLPs into 4 experts" in proc.stdout and "moe aux" in proc.stdout
        runs[name] = read_metrics(str(run_dir))
    dense, serial, parallel = runs["dense"], runs["upcycled"], runs["upcycled 3d"]
    assert [r["stage"] for r in serial] == ["dense", "grown"]
    assert serial[1]["loss"] == pytest.approx(dense[1]["loss"], rel=1e-6)
    assert parallel[1]["loss"] == pytest.approx(dense[1]["loss"], rel=1e-5)
    assert "moe_aux_loss" not in serial[0] and "moe_aux_loss" not in dense[1]
    for rows in (serial, parallel):
        first = rows[1]
        # Every layer of the 4 is MoE (moe_layer_freq 1), top-2: 4 * 2 assignments per token of the step,
        # from both pipeline stages and every data-parallel replica.
        assert sum(first["moe_tokens_per_expert"]) == 4 * 2 * TOKENS_PER_STEP
        assert first["moe_load_max_over_mean"] >= 1.0 and first["moe_dropped"] == 0
        assert 0.0 < first["moe_aux_loss"] and 0.0 < first["moe_z_loss"]
    for key in ("moe_aux_loss", "moe_z_loss", "moe_load_max_over_mean"):
        assert math.isclose(parallel[1][key], serial[1][key], rel_tol=1e-5), key
    assert parallel[1]["moe_tokens_per_expert"] == serial[1]["moe_tokens_per_expert"]

