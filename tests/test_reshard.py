"""Checkpoints across layouts, through the real entry point: a checkpoint saved at (tp2, pp2, dp2) with the
distributed optimizer loads at (tp1, pp4, dp2), (tp4, pp1, dp2) and (1, 1, 1) and the next steps log the
losses the original layout computes, with the per-parameter gradients of the first step after the load and
the weights and Adam moments of the last step the serial run's; a stage that grows the model's depth runs
under 3D parallelism and logs and saves what the serial run logs and saves."""
import pytest

from train_utils import (GOLDEN, GRAD_RTOL, STATE_RTOL, TINY, assert_same_training_state, read_metrics, run_train,
                         write_config)

# The resumed step starts from bitwise the saved weights; only the order of floating-point sums differs.
NEXT_STEP_RTOL = 1e-5
# One Adam step later: Adam divides by sqrt(v), which turns rounding in tiny gradients into relative
# differences of the update, so the step after allows a little more.
STEP_AFTER_RTOL = 1e-4


def test_reshard_at_load_time(tmp_path):
    cfg = write_config(tmp_path, TINY.replace("num_query_groups = 2", "num_query_groups = 4"))
    original, ckpt = str(tmp_path / "original"), str(tmp_path / "ckpt")
    run_train(cfg, original, "--parallel.tp=2", "--parallel.pp=2", "--parallel.sp=true", *GOLDEN,
              "--optimizer.distributed=true", f"--checkpoint.dir={ckpt}", "--checkpoint.save_interval=1", nproc=8)
    expected = {r["iteration"]: r["loss"] for r in read_metrics(original)}
    assert sorted(expected) == [1, 2, 3, 4]
    for name, nproc, layout in (("serial", 1, ()),
                                ("tp1pp4", 8, ("--parallel.pp=4",)),
                                ("tp4pp1", 8, ("--parallel.tp=4",))):
        run_dir = str(tmp_path / name)
        proc = run_train(cfg, run_dir, *layout, *GOLDEN, f"--checkpoint.load={ckpt}/iter_0000002",
                         f"--checkpoint.dir={tmp_path / (name + '_ckpt')}", "--checkpoint.save_interval=1", nproc=nproc)
        assert "resumed from" in proc.stdout
        rows = {r["iteration"]: r["loss"] for r in read_metrics(run_dir)}
        assert sorted(rows) == [3, 4], name
        assert rows[3] == pytest.approx(expected[3], rel=NEXT_STEP_RTOL), name
        assert rows[4] == pytest.approx(expected[4], rel=STEP_AFTER_RTOL), name
    # Step 3 starts from bitwise the loaded state (m of step 2 included), so exp_avg = beta1 m + (1 - beta1) g
    # compares step 3's per-parameter gradients; the original layout continued from memory and joins in.
    serial = tmp_path / "serial_ckpt"
    for name, root in (("tp1pp4", tmp_path / "tp1pp4_ckpt"), ("tp4pp1", tmp_path / "tp4pp1_ckpt"), ("tp2pp2", ckpt)):
        assert_same_training_state(root, serial, 3, GRAD_RTOL, kinds=("exp_avg",), what=name)
        assert_same_training_state(root, serial, 4, STATE_RTOL, kinds=("param", "exp_avg", "exp_avg_sq"), what=name)


GROWING = TINY.replace("num_layers = 4", "num_layers = 2").replace("train_iters = 4\n", "") + """
[[stages]]
name = "small"
train_iters = 2
[[stages]]
name = "grown"
train_iters = 2
grow.num_layers = 4
"""


def test_stage_growth_under_3d_parallelism_matches_serial(tmp_path):
    cfg = write_config(tmp_path, GROWING)
    runs = {}
    for name, nproc, layout in (("serial", 1, ()), ("3d", 8, ("--parallel.tp=2", "--parallel.pp=2", "--parallel.sp=true"))):
        run_dir = str(tmp_path / name)
        proc = run_train(cfg, run_dir, *layout, *GOLDEN, f"--checkpoint.dir={tmp_path / (name + '_ckpt')}",
                         nproc=nproc)
        assert "grew the model from 2 to 4 layers" in proc.stdout
        runs[name] = read_metrics(run_dir)
    assert [r["stage"] for r in runs["3d"]] == ["small", "small", "grown", "grown"]
    assert [r["loss"] for r in runs["3d"]] == pytest.approx([r["loss"] for r in runs["serial"]], rel=NEXT_STEP_RTOL)
    # The stage ends' checkpoints: the small model after step 2, the grown one after step 4.
    for iteration in (2, 4):
        assert_same_training_state(tmp_path / "3d_ckpt", tmp_path / "serial_ckpt", iteration, STATE_RTOL,
                                   kinds=("param", "exp_avg", "exp_avg_sq"), what="3d")
