"""README's first command, shortened: the hierarchical tp2 x pp2 x dp2 quick start on 8 CPU ranks (a 2-layer
model on general text grown to 4 layers for math), through the exact script with overrides for fewer steps
and fewer scored problems; its closing lines (loss, stage-1 vs final held-out math loss, accuracy by
difficulty) are checked against metrics.jsonl."""
import collections
import json
import os
import re
import subprocess

from train_utils import ROOT, read_metrics

NUMBER = r"\d+\.\d+"


def test_quickstart_runs_end_to_end(tmp_path):
    run_dir = tmp_path / "quickstart"
    env = dict(os.environ, MATH_EVAL_LIMIT="3")
    proc = subprocess.run(["bash", "examples/quickstart.sh", "--stages.general.train_iters=3",
                           "--stages.math.train_iters=2", f"--run.dir={run_dir}",
                           f"--checkpoint.dir={run_dir / 'checkpoints'}", "--training.log_interval=1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    assert "grew the model from 2 to 4 layers" in proc.stdout
    rows = read_metrics(str(run_dir))
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["stage"] for r in rows] == ["general"] * 3 + ["math"] * 2
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["iter_0000003", "iter_0000005", "latest"]

    evals = read_metrics(str(run_dir), event="eval")
    losses = [e for e in evals if e.get("task") == "loss"]
    assert [e["iteration"] for e in losses] == [3, 5] and losses[0]["tokens"] == losses[1]["tokens"] > 0
    math_evals = [e for e in evals if e.get("task") == "math"]
    assert len(math_evals) == 1 and 0.0 <= math_evals[0]["accuracy"] <= 1.0
    with open(os.path.join(ROOT, "data/quickstart/math_eval.jsonl"), encoding="utf-8") as f:
        levels = collections.Counter(str(json.loads(line)["steps"]) for line in f.readlines()[:3])

    lines = proc.stdout.strip().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("final training loss"))
    closing = lines[first:]
    assert len(closing) == 3 + len(levels), closing
    held_out = re.fullmatch(rf"held-out math loss ({NUMBER}) of the stage-1 model \(2 layers, iteration 3\) -> "
                            rf"({NUMBER}) of the final one \(4 layers, iteration 5\), over (\d+) tokens", closing[1])
    assert held_out, closing[1]
    assert [float(held_out[1]), float(held_out[2])] == [round(e["loss"], 4) for e in losses]
    assert int(held_out[3]) == losses[1]["tokens"]
    headline = re.fullmatch(rf"word-problem accuracy ({NUMBER})% on 3 held-out problems, by difficulty:", closing[2])
    assert headline and float(headline[1]) == round(100 * math_evals[0]["accuracy"], 1), closing[2]
    printed = {}
    for line in closing[3:]:
        level = re.fullmatch(rf"  level (\d) \(\1 steps?\): ({NUMBER})% \((\d+)/(\d+)\)", line)
        assert level, line
        printed[level[1]] = int(level[4])
        assert int(level[3]) == math_evals[0]["by_steps"][level[1]]["correct"]
    assert printed == dict(levels)
