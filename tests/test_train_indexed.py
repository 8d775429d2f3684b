"""The trainer on real data: tokenizer -> preprocess_data -> data.source = "indexed" with a blend, the
vocabulary taken from the tokenizer, and validation loss logged as eval events."""
import json
import math
import os
import subprocess
import sys

from megagopher.data.tokenizer import load_tokenizer
from megagopher.training.checkpoint import CheckpointReader, iter_dir
from train_utils import ROOT, TINY, read_metrics, run_train, write_config


def _tool(*args):
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True, capture_output=True, text=True, timeout=300)


def test_indexed_blend_tokenizer_vocab_and_eval(tmp_path):
    docs = tmp_path / "docs.jsonl"
    with open(docs, "w") as f:
        for i in range(300):
            f.write(json.dumps({"text": f"Document {i}: the quick brown fox jumps over {i % 7} lazy dogs. " * 3}) + "\n")
    math_docs = tmp_path / "math.jsonl"
    with open(math_docs, "w") as f:
        for i in range(300):
            f.write(json.dumps({"text": f"Q: {i} + {i + 1}? A: {2 * i + 1}. The answer is {2 * i + 1}."}) + "\n")
    tok = tmp_path / "tok"
    _tool("tools/train_tokenizer.py", "--input", str(docs), "--vocab-size", "300", "--output-dir", str(tok))
    for name, src in (("general", docs), ("math", math_docs)):
        _tool("tools/preprocess_data.py", "--input", str(src), "--tokenizer-dir", str(tok),
              "--output-prefix", str(tmp_path / name), "--append-eod")
    cfg = write_config(tmp_path, TINY.replace('source = "synthetic"', f'''source = "indexed"
tokenizer_dir = "{tok}"
split = "90,10,0"
blend = [[0.7, "{tmp_path / 'general_text_document'}"], [0.3, "{tmp_path / 'math_text_document'}"]]'''))
    run_dir, ckpt = str(tmp_path / "run"), str(tmp_path / "ckpt")
    run_train(cfg, run_dir, "--training.eval_interval=2", f"--checkpoint.dir={ckpt}", nproc=2,
              *["--parallel.tp=2"])
    rows = read_metrics(run_dir)
    evals = read_metrics(run_dir, event="eval")
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4]
    assert [e["iteration"] for e in evals] == [2, 4] and all(math.isfinite(e["loss"]) for e in evals)
    vocab = load_tokenizer(str(tok)).vocab_size
    embedding = CheckpointReader(iter_dir(ckpt, 4)).full_tensor("embedding.word.weight")
    assert embedding.shape[0] == vocab
    assert os.path.exists(os.path.join(str(tmp_path), "index-cache"))
