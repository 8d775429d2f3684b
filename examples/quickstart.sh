#!/usr/bin/env bash
# The quick start: Gopher-style hierarchical pre-training of tiny models with 3D parallelism on CPU
# (tensor x pipeline x data = 2 x 2 x 2 on 8 gloo ranks). Stage 1 trains a 2-layer model on general text;
# progressive stacking grows it to 4 layers, which stage 2 trains on math word problems.
#
#   bash examples/quickstart.sh [--section.key=value ...]      (overrides go to megagopher.train)
#
# First run: sets up ./.venv, builds the corpora from the Python standard library and a word-problem
# generator (the training problems weighted towards the easy levels), trains a byte-level BPE tokenizer
# and writes Megatron-format datasets under data/quickstart. Then trains (resuming if
# runs/quickstart/checkpoints has a checkpoint) and ends by printing the final loss, the held-out math
# loss of the stage-1 model against the final one, and the word-problem accuracy on the held-out split
# by difficulty (all also logged in runs/quickstart/metrics.jsonl). MATH_EVAL_LIMIT (default 500, the
# whole split) sets how many held-out problems are scored.
set -euo pipefail
cd "$(dirname "$0")/.."
bash examples/setup_env.sh
PY=.venv/bin/python
DATA=data/quickstart
export OMP_NUM_THREADS=1

if [ ! -f "$DATA/math_train_text_document.idx" ]; then
  echo "== building the quick start's data in $DATA"
  $PY tools/make_corpora.py --output-dir "$DATA" --seed 1 --math-train 20000 --math-eval 500 \
      --math-levels 8,2,1,1 --max-mb 2
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

# The run's directories, the stage-1 checkpoint (every stage's end is saved; keep_last = 0 keeps it) and
# the depth of the model before and after growth.
read -r RUN_DIR CKPT_DIR STAGE1_CKPT LAYERS < <($PY -c "import sys
from megagopher.config import load_config, parse_overrides
from megagopher.training.checkpoint import iter_dir
c = load_config('examples/configs/quickstart.toml', parse_overrides(sys.argv[1:]))
depth = [c.model.num_layers] + [st.grow['num_layers'] for st in c.stages if st.grow]
print(c.run.dir, c.checkpoint.dir, iter_dir(c.checkpoint.dir, c.stages[0].train_iters), f'{depth[0]},{depth[-1]}')" "$@")
# One process evaluates, so it may use both cores.
export OMP_NUM_THREADS=2
echo "== evaluating: held-out math loss of the stage-1 and the final model, word-problem accuracy"
for ckpt in "$STAGE1_CKPT" "$CKPT_DIR"; do
  $PY -m megagopher.evaluate --checkpoint "$ckpt" --task loss --data "$DATA/math_eval.jsonl" \
      --metrics "$RUN_DIR/metrics.jsonl"
done
$PY -m megagopher.evaluate --checkpoint "$CKPT_DIR" --task math --data "$DATA/math_eval.jsonl" \
    --limit "${MATH_EVAL_LIMIT:-500}" --metrics "$RUN_DIR/metrics.jsonl"
$PY - "$RUN_DIR/metrics.jsonl" "$LAYERS" <<'PYEND'
import json, sys
first_depth, final_depth = sys.argv[2].split(",")
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
train = [r for r in rows if r.get("event", "train") == "train"]
evals = [r for r in rows if r.get("event") == "eval"]
stage1_loss, final_loss = [r for r in evals if r.get("task") == "loss"][-2:]
math = [r for r in evals if r.get("task") == "math"][-1]
print(f"final training loss {train[-1]['loss']:.4f} (iteration {train[-1]['iteration']}, stage {train[-1]['stage']}); "
      f"first {train[0]['loss']:.4f}")
print(f"held-out math loss {stage1_loss['loss']:.4f} of the stage-1 model ({first_depth} layers, iteration "
      f"{stage1_loss['iteration']}) -> {final_loss['loss']:.4f} of the final one ({final_depth} layers, iteration "
      f"{final_loss['iteration']}), over {final_loss['tokens']} tokens")
print(f"word-problem accuracy {100 * math['accuracy']:.1f}% on {math['examples']} held-out problems, by difficulty:")
for steps, r in math["by_steps"].items():
    print(f"  level {steps} ({steps} step{'s' if steps != '1' else ''}): {100 * r['accuracy']:.1f}% "
          f"({r['correct']}/{r['examples']})")
PYEND
