#!/usr/bin/env bash
# Several nodes with torchrun's c10d rendezvous. Run the same command on every node:
#   NNODES=4 NODE_RANK=<0..3> MASTER_ADDR=<node 0's address> \
#     bash examples/launch_multinode.sh examples/configs/gopher_7.1b.toml [--section.key=value ...]
# Rank order is tp-cp-dp-pp (tensor parallelism varies fastest), so keep parallel.tp <= GPUs per node:
# TP's all-reduces then stay on NVLink and only pipeline and data-parallel traffic crosses nodes.
set -euo pipefail
CONFIG=$1; shift
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
exec torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv-id "${RUN_ID:-megagopher}" \
    -m megagopher.train --config "$CONFIG" "$@"
