#!/usr/bin/env bash
# Creates ./.venv (if it does not exist yet) with torch's CPU build installed *first* (an open-ended torch
# requirement resolved by pip on its own pulls a multi-GB CUDA build), then megagopher with its test extra,
# then Megatron-Core without its dependencies (a test reads our datasets with its reader).
# On a GPU machine, install the torch build for your CUDA first; this script then keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
PIP=".venv/bin/python -m pip -q --disable-pip-version-check"
.venv/bin/python -c "import torch" 2>/dev/null || $PIP install "torch==2.13.0"
.venv/bin/python -c "import megagopher, pytest, xdist, transformers, tokenizers, sentencepiece, tiktoken, pyarrow, datasets, wandb, lm_eval" 2>/dev/null || $PIP install -e ".[test]"
.venv/bin/python -c "import megatron.core" 2>/dev/null || $PIP install --no-deps megatron-core
