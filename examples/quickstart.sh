#!/usr/bin/env bash
# The quick start: a Gopher-style tiny model pretrained in two stages (general text, then math word
# problems) with 3D parallelism on CPU: tensor x pipeline x data = 2 x 2 x 2 on 8 gloo ranks.
#
#   bash examples/quickstart.sh [--section.key=value ...]      (overrides go to megagopher.train)
#
# First run: sets up ./.venv, builds the corpora from the Python standard library and a word-problem
# generator, trains a byte-level BPE tokenizer and writes Megatron-format datasets under data/quickstart.
# Then trains (resuming if runs/quickstart/checkpoints has a checkpoint), and ends by printing the final
# loss and the word-problem accuracy on the held-out split (also logged in runs/quickstart/metrics.jsonl).
# MATH_EVAL_LIMIT (default 100) sets how many held-out problems are scored.
set -euo pipefail
cd "$(dirname "$0")/.."
bash examples/setup_env.sh
PY=.venv/bin/python
DATA=data/quickstart
export OMP_NUM_THREADS=1

if [ ! -f "$DATA/math_train_text_document.idx" ]; then
  echo "== building the quick start's data in $DATA"
  $PY tools/make_corpora.py --output-dir "$DATA" --seed 1 --math-train 5000 --math-eval 500 --max-mb 2
  cat "$DATA/general.jsonl" "$DATA/math_train.jsonl" > "$DATA/tokenizer_corpus.jsonl"
  $PY tools/train_tokenizer.py --input "$DATA/tokenizer_corpus.jsonl" --vocab-size 2048 --output-dir "$DATA/tokenizer"
  for name in general math_train; do
    $PY tools/preprocess_data.py --input "$DATA/$name.jsonl" --tokenizer-dir "$DATA/tokenizer" \
        --output-prefix "$DATA/$name" --workers 2 --append-eod
  done
fi

echo "== training (tp2 x pp2 x dp2, 8 ranks)"
$PY -m torch.distributed.run --standalone --nproc-per-node 8 -m megagopher.train \
    --config examples/configs/quickstart.toml "$@"

read -r RUN_DIR CKPT_DIR < <($PY -c "import sys; from megagopher.config import load_config, parse_overrides
c = load_config('examples/configs/quickstart.toml', parse_overrides(sys.argv[1:])); print(c.run.dir, c.checkpoint.dir)" "$@")
echo "== evaluating word-problem accuracy on the held-out split"
$PY -m megagopher.evaluate --checkpoint "$CKPT_DIR" --task math --data "$DATA/math_eval.jsonl" \
    --limit "${MATH_EVAL_LIMIT:-100}" --metrics "$RUN_DIR/metrics.jsonl"
$PY - "$RUN_DIR/metrics.jsonl" <<'PYEND'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
train = [r for r in rows if r.get("event", "train") == "train"]
math = [r for r in rows if r.get("event") == "eval" and r.get("task") == "math"]
print(f"final training loss {train[-1]['loss']:.4f} (iteration {train[-1]['iteration']}, stage {train[-1]['stage']}); "
      f"first {train[0]['loss']:.4f}")
if math:
    print(f"word-problem accuracy {100 * math[-1]['accuracy']:.1f}% on {math[-1]['examples']} held-out problems")
PYEND
