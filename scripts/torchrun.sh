#!/usr/bin/env bash
# Shared launcher of the train_*.sh recipes: torchrun train.py with the node layout taken from the environment.
#   NPROC_PER_NODE (default 8), NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1), MASTER_PORT (29500), PYTHON.
# Every argument is passed to train.py, e.g. --data_path=/path/to/imagenet --local_out_dir_path=runs/d16.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then  # the Makefile's virtualenv when there is one
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
exec "$PYTHON" -m torch.distributed.run \
  --nproc_per_node="${NPROC_PER_NODE:-8}" --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" \
  --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29500}" \
  train.py "$@"
