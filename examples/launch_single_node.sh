#!/usr/bin/env bash
# One node, all its GPUs (NCCL, compiled Triton kernels):
#   bash examples/launch_single_node.sh examples/configs/gopher_1.4b.toml [--section.key=value ...]
set -euo pipefail
CONFIG=$1; shift
NPROC=${NPROC:-$(python -c "import torch; print(torch.cuda.device_count() or 1)")}
exec torchrun --standalone --nproc-per-node "$NPROC" -m megagopher.train --config "$CONFIG" "$@"
