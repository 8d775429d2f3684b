#!/usr/bin/env bash
# CodeGen-style staged pretraining (natural language, then code) at toy scale on 4 CPU ranks.
#   bash examples/codegen_cpu.sh [--section.key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash examples/setup_env.sh
PY=.venv/bin/python
DATA=data/codegen_cpu
export OMP_NUM_THREADS=1
if [ ! -f "$DATA/code_text_document.idx" ]; then
  $PY tools/make_corpora.py --output-dir "$DATA" --seed 1 --math-train 10 --math-eval 10 --max-mb 2
  cat "$DATA/general.jsonl" "$DATA/code.jsonl" > "$DATA/tokenizer_corpus.jsonl"
  $PY tools/train_tokenizer.py --input "$DATA/tokenizer_corpus.jsonl" --vocab-size 4096 --output-dir "$DATA/tokenizer"
  for name in general code; do
    $PY tools/preprocess_data.py --input "$DATA/$name.jsonl" --tokenizer-dir "$DATA/tokenizer" \
        --output-prefix "$DATA/$name" --workers 2 --append-eod
  done
fi
$PY -m torch.distributed.run --standalone --nproc-per-node 4 -m megagopher.train --config examples/configs/codegen_cpu.toml "$@"
$PY -m megagopher.generate --checkpoint runs/codegen_cpu/checkpoints --prompt "def fibonacci(n):" --max-new-tokens 48 --greedy
