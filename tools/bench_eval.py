"""Benchmark (not a timed test): the quick start's math evaluation one problem at a time against batched
generation, on the same checkpoint and problems. Asserts that every problem's generated text is the same
and prints both times and their ratio.

    python tools/bench_eval.py [--checkpoint DIR] [--data data/quickstart/math_eval.jsonl] [--limit N]
                               [--batch-size 32] [--max-new-tokens 128] [--threads 2]

"One at a time" is ``megagopher.evaluate --task math --batch-size 1``: megagopher.generate.generate per
problem, the path evaluation took before batched generation; "batched" is the default --batch-size
(megagopher.generation.batch). Both go through megagopher.evaluation.math_task, as the evaluation does.

The checkpoint: --checkpoint; else runs/quickstart/checkpoints when the quick start has been run; else one
built here once and kept in --work-dir: the quick start's final model shape (4 layers, hidden 128, 4 heads,
FFN 512, RoPE, RMSNorm, GeLU, tied embeddings, 128-token context, its 2048-token BPE tokenizer) trained by
megagopher.train in one process for 300 steps on the quick start's math corpus, so that its solutions take
the corpus's form and end at "The answer is ..." after varied lengths, as the quick start's model's do
(a random model would write 128 tokens of noise for every problem). It needs the quick start's data
(bash examples/quickstart.sh builds it in data/quickstart).
"""
import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megagopher.errors import EXIT_INPUT_ERROR  # noqa: E402

DATA = os.path.join(ROOT, "data", "quickstart")
CONFIG = """\
[model]
num_layers = 4
hidden_size = 128
num_attention_heads = 4
ffn_hidden_size = 512
seq_length = 128
normalization = "rmsnorm"
activation = "gelu"
position_embedding = "rope"
tie_embeddings = true
bias = false
[training]
micro_batch_size = 16
global_batch_size = 16
train_iters = 300
seed = 1234
precision = "fp32"
log_interval = 50
[optimizer]
lr = 3e-3
min_lr = 3e-4
warmup_iters = 20
decay = "cosine"
weight_decay = 0.1
clip_grad = 1.0
[data]
source = "indexed"
tokenizer_dir = "{data}/tokenizer"
split = "100,0,0"
blend = [[1.0, "{data}/math_train_text_document"]]
[checkpoint]
dir = "{work}/checkpoints"
save_interval = 0
[run]
dir = "{work}/run"
tensorboard = false
"""


def build_checkpoint(work_dir):
    """The checkpoint of the module docstring, trained once into ``work_dir``."""
    ckpt = os.path.join(work_dir, "checkpoints")
    if os.path.exists(os.path.join(ckpt, "latest")):
        return ckpt
    if not os.path.exists(os.path.join(DATA, "math_train_text_document.idx")):
        raise ValueError(f"{DATA} has no math_train_text_document.idx: run bash examples/quickstart.sh (or give "
                         "--checkpoint)")
    os.makedirs(work_dir, exist_ok=True)
    config = os.path.join(work_dir, "bench_eval.toml")
    with open(config, "w") as f:
        f.write(CONFIG.format(data=DATA, work=work_dir))
    print(f"bench_eval: training the benchmark's checkpoint into {ckpt} (300 steps, one process)", flush=True)
    subprocess.run([sys.executable, "-m", "megagopher.train", "--config", config], cwd=ROOT, check=True)
    return ckpt


def run_math(lm, rows, max_new_tokens, batch_size):
    """(seconds, result, [generated text per problem]) of the math task at ``batch_size``."""
    from megagopher.evaluation.math_task import math_accuracy, math_completer
    seen = []
    start = time.perf_counter()
    result = math_accuracy(rows, math_completer(lm, max_new_tokens, batch_size), seen.append)
    return time.perf_counter() - start, result, [r["generated"] for r in seen]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--data", default=os.path.join(DATA, "math_eval.jsonl"))
    p.add_argument("--limit", type=int, default=None, help="the first N problems (default: all)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=128, help="as megagopher.evaluate's default")
    p.add_argument("--threads", type=int, default=2, help="torch threads (the quick start evaluates with 2)")
    p.add_argument("--work-dir", default="/tmp/megagopher_bench_eval", help="where a built checkpoint is kept")
    args = p.parse_args(argv)
    import torch
    from megagopher.evaluation.common import read_jsonl
    from megagopher.generate import load_model
    torch.set_num_threads(args.threads)
    try:
        quickstart = os.path.join(ROOT, "runs", "quickstart", "checkpoints")
        ckpt = args.checkpoint or (quickstart if os.path.exists(os.path.join(quickstart, "latest"))
                                   else build_checkpoint(args.work_dir))
        rows = read_jsonl(args.data, args.limit)
        lm = load_model(ckpt, device="cpu", need_tokenizer=True)
    except (ValueError, FileNotFoundError) as e:
        print(f"bench_eval: error: {e}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    print(f"bench_eval: {len(rows)} problems of {args.data}, checkpoint {lm.path}, max_new_tokens "
          f"{args.max_new_tokens}, {args.threads} threads", flush=True)
    one_s, one_result, one_text = run_math(lm, rows, args.max_new_tokens, 1)
    print(f"bench_eval: one at a time: {one_s:.1f} s ({len(rows) / one_s:.2f} problems/s), accuracy "
          f"{one_result['accuracy']:.4f}", flush=True)
    batch_s, batch_result, batch_text = run_math(lm, rows, args.max_new_tokens, args.batch_size)
    print(f"bench_eval: batch size {args.batch_size}: {batch_s:.1f} s ({len(rows) / batch_s:.2f} problems/s), "
          f"accuracy {batch_result['accuracy']:.4f}", flush=True)
    differ = [i for i, (a, b) in enumerate(zip(one_text, batch_text)) if a != b]
    tokens = sum(len(lm.tokenizer.encode(t)) for t in one_text)
    print(f"bench_eval: {tokens} generated tokens in all; speed-up {one_s / batch_s:.2f}x; "
          f"{len(rows) - len(differ)}/{len(rows)} problems generated identical text", flush=True)
    assert not differ, f"problems {differ[:10]} generated different text batched and one at a time"
    assert one_result == batch_result, (one_result, batch_result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
