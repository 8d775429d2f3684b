"""training.compile = true: each transformer layer wrapped in torch.compile (inductor, CPU here) trains to
the eager run's losses and gradient norms, one process and under tensor parallelism with sequence
parallelism. Inductor may reorder floating-point sums, so equality is to fp32 rounding."""
import pytest

from train_utils import TINY, read_metrics, run_train, write_config

RTOL = 1e-5  # reordered fp32 sums over a few steps (the resharding tests' bound)
SHORT = TINY.replace("train_iters = 4", "train_iters = 3").replace("num_layers = 4", "num_layers = 2")


@pytest.mark.parametrize("layout, nproc", [((), 1), (("--parallel.tp=2", "--parallel.sp=true"), 2)],
                         ids=["tp1", "tp2-sp"])
def test_compiled_layers_train_like_eager(tmp_path, layout, nproc):
    cfg = write_config(tmp_path, SHORT)
    rows = {}
    for mode in ("eager", "compiled"):
        run_dir = str(tmp_path / mode)
        run_train(cfg, run_dir, *layout, f"--training.compile={str(mode == 'compiled').lower()}", nproc=nproc,
                  timeout=600)
        rows[mode] = read_metrics(run_dir)
    assert [r["loss"] for r in rows["compiled"]] == pytest.approx([r["loss"] for r in rows["eager"]], rel=RTOL)
    assert [r["grad_norm"] for r in rows["compiled"]] == pytest.approx([r["grad_norm"] for r in rows["eager"]],
                                                                        rel=RTOL)
