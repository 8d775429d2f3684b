"""examples/continue_from_hf.sh (README's "Continue a Hugging Face model"), shortened (SHORT=1: a 0.3 MB corpus and
3 training steps): a tokenizer.json and a random Llama built locally, imported, a Parquet corpus preprocessed with
the imported tokenizer, training at tp 2 x pp 2 on 4 CPU ranks, greedy generation by megagopher.generate --prompt,
the export, and transformers' AutoTokenizer + AutoModelForCausalLM on it generating the same text (the script
exits 1 otherwise)."""
import os
import subprocess
import time

from train_utils import ROOT, read_metrics


def test_continue_from_hf_runs_end_to_end(tmp_path):
    work = tmp_path / "work"
    start = time.monotonic()
    proc = subprocess.run(["bash", "examples/continue_from_hf.sh", "--training.log_interval=1"], cwd=ROOT,
                          env=dict(os.environ, SHORT="1", WORK=str(work)), capture_output=True, text=True, timeout=900)
    seconds = time.monotonic() - start
    print(f"examples/continue_from_hf.sh (SHORT=1) took {seconds:.0f} s")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    phases = [line for line in proc.stdout.splitlines() if line.startswith("== [")]
    assert [p.split("] ", 1)[1][:3] for p in phases] == ["1/6", "2/6", "3/6", "4/6", "5/6", "6/6", "don"], phases
    assert "same continuation: AutoTokenizer + AutoModelForCausalLM" in proc.stdout
    assert sorted(os.listdir(work / "model" / "tokenizer")) == ["generation_config.json", "tokenizer.json",
                                                                "tokenizer_config.json"]
    assert [r["iteration"] for r in read_metrics(str(work / "run"))] == [1, 2, 3]
    assert "megagopher: saved checkpoint" in proc.stdout and (work / "model" / "iter_0000003").is_dir()
