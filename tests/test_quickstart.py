"""README's first command, shortened: the staged tp2 x pp2 x dp2 quick start on 8 CPU ranks, through the
exact script with overrides for fewer steps and fewer scored problems."""
import os
import subprocess

from train_utils import ROOT, read_metrics


def test_quickstart_runs_end_to_end(tmp_path):
    run_dir = tmp_path / "quickstart"
    env = dict(os.environ, MATH_EVAL_LIMIT="3")
    proc = subprocess.run(["bash", "examples/quickstart.sh", "--stages.general.train_iters=3",
                           "--stages.math.train_iters=2", f"--run.dir={run_dir}",
                           f"--checkpoint.dir={run_dir / 'checkpoints'}", "--training.log_interval=1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    rows = read_metrics(str(run_dir))
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["stage"] for r in rows] == ["general"] * 3 + ["math"] * 2
    evals = read_metrics(str(run_dir), event="eval")
    math_evals = [e for e in evals if e.get("task") == "math"]
    assert len(math_evals) == 1 and 0.0 <= math_evals[0]["accuracy"] <= 1.0
    last_lines = proc.stdout.strip().splitlines()[-2:]
    assert last_lines[0].startswith("final training loss") and last_lines[1].startswith("word-problem accuracy")
