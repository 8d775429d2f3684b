"""The trainer through its real entry point: config handling, tp = 2 (with and without sequence
parallelism) logging the same losses as tp = 1, and bad layouts failing on every rank before any
collective."""
import os
import time

import pytest
import tomllib

from megagopher.config import ConfigError, load_config, parse_overrides, to_toml, validate
from train_utils import (GOLDEN, GRAD_RTOL, STATE_RTOL, assert_same_training_state, launch_ranks, read_metrics,
                         run_train, write_config)

# The same model, data and seed on 1 or 2 TP ranks: only the order of floating-point sums differs.
LOSS_RTOL = 1e-5


def test_overrides_types_and_round_trip(tmp_path):
    cfg_path = write_config(tmp_path)
    over = parse_overrides(["--parallel.sp=true", "--optimizer.lr=3e-4", "--run.dir=runs/x",
                            "--data.blend", '[[1.0, "a"]]', "--training.train_iters", "5"])
    assert over == {"parallel.sp": True, "optimizer.lr": 3e-4, "run.dir": "runs/x", "data.blend": [[1.0, "a"]],
                    "training.train_iters": 5}
    cfg = load_config(cfg_path, over)
    assert cfg.stages[0].train_iters == 5 and cfg.parallel.sp is True
    text = to_toml(cfg)
    tomllib.loads(text)
    again = load_config(write_config(tmp_path, text, "again.toml"))
    assert again == cfg
    with pytest.raises(ConfigError, match=r"model\.hidden_sizes.*valid keys of \[model\].*hidden_size"):
        load_config(cfg_path, {"model.hidden_sizes": 32})
    with pytest.raises(ConfigError, match=r"parallel\.schedule = 'zigzag'"):
        load_config(cfg_path, {"parallel.schedule": "zigzag"})
    with pytest.raises(ConfigError, match=r"training\.micro_batch_size = 'two' must be an integer"):
        load_config(cfg_path, {"training.micro_batch_size": "two"})


def test_stages_parse_and_override(tmp_path):
    text = open(write_config(tmp_path)).read() + """
[[stages]]
name = "general"
train_iters = 3
optimizer.lr = 1e-3
[[stages]]
name = "math"
train_iters = 2
model.seq_length = 32
training.global_batch_size = 16
"""
    cfg = load_config(write_config(tmp_path, text, "staged.toml"))
    assert [s.name for s in cfg.stages] == ["general", "math"]
    first, second = cfg.stage(0), cfg.stage(1)
    assert first.optimizer.lr == 1e-3 and second.optimizer.lr == 3e-3
    assert second.model.seq_length == 32 and second.training.global_batch_size == 16
    bad = text.replace('model.seq_length = 32', 'model.hidden_size = 64')
    with pytest.raises(ConfigError, match=r"only model\.seq_length"):
        load_config(write_config(tmp_path, bad, "bad.toml"))


@pytest.mark.parametrize("overrides, world, message", [
    ({"parallel.tp": 3}, 6, r"model\.num_attention_heads = 4 is not divisible by parallel\.tp = 3"),
    ({"parallel.tp": 2}, 3, r"world size 3 is not divisible by .*tp \* parallel\.cp \* parallel\.pp"),
    ({"parallel.tp": 4}, 4, r"model\.num_query_groups = 2 is not divisible by parallel\.tp = 4"),
    ({"parallel.pp": 3}, 3, r"model\.num_layers = 4 is not divisible by parallel\.pp \* parallel\.vpp = 3"),
    ({"training.global_batch_size": 6}, 4, r"training\.global_batch_size = 6 is not divisible by "
                                             r"training\.micro_batch_size \* dp = 8"),
    ({"parallel.sp": True, "parallel.tp": 2, "model.seq_length": 15}, 2,
     r"model\.seq_length = 15 is not divisible by parallel\.tp"),
    ({"parallel.dp": 3}, 2, r"parallel\.dp = 3 but world size 2"),
])
def test_validation_messages(tmp_path, overrides, world, message):
    cfg = load_config(write_config(tmp_path), overrides)
    with pytest.raises(ConfigError, match=message):
        validate(cfg, world)


def test_bad_layout_fails_on_every_rank_without_hanging(tmp_path):
    start = time.time()
    proc = run_train(write_config(tmp_path), str(tmp_path / "bad"), "--parallel.tp=3", nproc=2, check=False,
                     timeout=120)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    # Both ranks report it (torchrun prefixes nothing; count the message).
    assert out.count("world size 2 is not divisible by parallel.tp") == 2, out[-2000:]
    assert time.time() - start < 60


def test_tp2_logs_the_same_losses_as_tp1(tmp_path):
    """The golden check end to end: losses and gradient norms of every step, the per-parameter gradients of
    step 1 (exp_avg of its checkpoint, clipping off) and the weights and Adam moments after the last step."""
    cfg = write_config(tmp_path)
    runs = {}
    for name, nproc, extra in (("tp1", 1, ()), ("tp2", 2, ("--parallel.tp=2",)),
                               ("tp2sp", 2, ("--parallel.tp=2", "--parallel.sp=true"))):
        run_dir = str(tmp_path / name)
        run_train(cfg, run_dir, *extra, *GOLDEN, f"--checkpoint.dir={tmp_path / name}_ckpt",
                  "--checkpoint.save_interval=1", nproc=nproc)
        runs[name] = read_metrics(run_dir)
        assert os.path.exists(os.path.join(run_dir, "config.toml"))
    ref = [r["loss"] for r in runs["tp1"]]
    assert len(ref) == 4 and ref[-1] < ref[0]
    for name in ("tp2", "tp2sp"):
        losses = [r["loss"] for r in runs[name]]
        assert losses == pytest.approx(ref, rel=LOSS_RTOL), name
        assert [r["iteration"] for r in runs[name]] == [1, 2, 3, 4]
        assert [r["grad_norm"] for r in runs[name]] == pytest.approx([r["grad_norm"] for r in runs["tp1"]],
                                                                       rel=1e-4)
        ckpt, serial = tmp_path / f"{name}_ckpt", tmp_path / "tp1_ckpt"
        assert_same_training_state(ckpt, serial, 1, GRAD_RTOL, kinds=("exp_avg",), what=name)
        assert_same_training_state(ckpt, serial, 4, STATE_RTOL, kinds=("param", "exp_avg", "exp_avg_sq"), what=name)


def test_non_finite_loss_stops_every_rank_with_status_3(tmp_path):
    """training.nan_policy = "stop" (the default): a non-finite loss ends the run with exit status 3 (the
    documented contract, docs/ARCHITECTURE.md 4.1) and one line, on every rank, including the first pipeline
    stage, which computes no loss and learns of it from the step's agreement. A learning rate of 1e30 makes
    step 1's update overflow the weights, so step 2's loss is NaN."""
    statuses, lines = launch_ranks(write_config(tmp_path), str(tmp_path / "nan"), "--parallel.pp=2",
                                   "--optimizer.lr=1e30", "--optimizer.warmup_iters=0", "--training.nan_policy=stop",
                                   nproc=2)
    assert statuses == [3, 3], (statuses, lines)
    for rank_lines in lines:
        assert len(rank_lines) == 1, rank_lines
        assert rank_lines[0].startswith("megagopher.train: non-finite loss nan at iteration 2 on rank(s) [1]"), \
            rank_lines
    assert [r["iteration"] for r in read_metrics(str(tmp_path / "nan"))] == [1]


def test_stage_overrides_from_the_command_line(tmp_path):
    text = open(write_config(tmp_path)).read() + """
[[stages]]
name = "general"
train_iters = 30
[[stages]]
name = "math"
train_iters = 20
"""
    path = write_config(tmp_path, text, "staged.toml")
    cfg = load_config(path, parse_overrides(["--stages.general.train_iters=2", "--stages.math.optimizer.lr=5e-4"]))
    assert [s.train_iters for s in cfg.stages] == [2, 20]
    assert cfg.stages[1].overrides[("optimizer", "lr")] == 5e-4
    with pytest.raises(ConfigError, match=r"NAME one of \['general', 'math'\]"):
        load_config(path, {"stages.code.train_iters": 1})
    with pytest.raises(ConfigError, match=r"unknown key optimizer\.lrr"):
        load_config(path, {"stages.math.optimizer.lrr": 1.0})


@pytest.mark.parametrize("name, world", [
    ("tiny", 1), ("quickstart", 8), ("codegen_cpu", 4), ("long_context_cpu", 4),
    ("gopher_44m", 8), ("gopher_117m", 8), ("gopher_417m", 8), ("gopher_1.4b", 8), ("gopher_7.1b", 8),
    ("codegen_350m", 8), ("codegen_2.7b", 8), ("codegen_6.1b", 8), ("codegen_16.1b", 8),
    ("qwen3_8b", 8), ("deepseek_v3_16b", 8), ("deepseek_tiny_cpu", 8),
])
def test_example_configs_are_valid_for_their_launchers(name, world):
    from train_utils import ROOT
    cfg = load_config(os.path.join(ROOT, "examples", "configs", f"{name}.toml"))
    assert validate(cfg, world) >= 1


def test_batch_rampup_and_params_norm(tmp_path):
    run_dir = str(tmp_path / "ramp")
    run_train(write_config(tmp_path), run_dir, "--training.rampup_batch_size=[4, 4, 16]", "--training.train_iters=6",
              "--training.log_params_norm=true")
    rows = read_metrics(run_dir)
    assert [r["global_batch_size"] for r in rows] == [4, 4, 4, 4, 8, 8]
    assert [r["tokens"] for r in rows] == [16 * n for n in (4, 8, 12, 16, 24, 32)]
    assert all(r["params_norm"] > 0 for r in rows)
    with pytest.raises(ConfigError, match=r"rampup_batch_size = \[3, 5, 16\] passes through global batch size 3"):
        cfg = load_config(write_config(tmp_path), {"training.rampup_batch_size": [3, 5, 16]})
        validate(cfg, 1)
