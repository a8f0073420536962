#!/usr/bin/env bash
# Shared launcher of the train_*.sh recipes: torchrun train.py with the node layout taken from the environment.
#   NPROC_PER_NODE (default 8), NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1), MASTER_PORT (29500), PYTHON
#   (default: the active environment's python, else the checkout's .venv: scripts/pick_python.sh).
# Every argument is passed to train.py, after --workers=N, e.g. --data_path=/path/to/imagenet
# --local_out_dir_path=runs/d16.
# N, the data-loader processes per rank, is WORKERS if set, else this node's cores (nproc: the CPUs the job may use)
# shared by its ranks, one core left to each rank's own process, from 1 to 8 (8 ranks: 8 on 72+ cores, 3 on 32); a
# later --workers wins. The images seen do not depend on it.
# Relative paths in the flags are the caller's: the launcher stays in the folder it was started from.
# Memory: --bs is the global batch per optimizer step. When a rank's activations do not fit, add --grad_ckpt=1
# (blocks recomputed in the backward; projected from CPU measurements: M-VAR-d30 from 6 to 85 images per 80 GB
# GPU, docs/benchmarks.md) and/or --ac=K (K micro-batches per step, same lr); --fsdp=1 shards the weights and
# AdamW states, not the activations.
# Preemption: on SIGTERM every rank finishes its step and saves (README, Preemption). torchrun kills its workers 30 s
# after forwarding the signal, too soon for a large save (d16: ~5 GB, d30: ~34 GB with AdamW): the launcher raises it
# to TORCH_ELASTIC_SHUTDOWN_TIMEOUT (default here 300 s; torch 2.14 reads it, 2.11 still kills at 30 s). The
# scheduler's own grace period (SLURM GraceTime/KillWait, Kubernetes terminationGracePeriodSeconds) must cover it too.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
if [ "${NNODES:-1}" != 1 ] && { [ -z "${MASTER_ADDR:-}" ] || [ -z "${NODE_RANK:-}" ]; }; then
  echo "error: NNODES=$NNODES needs MASTER_ADDR (node 0's address, the same on every node) and NODE_RANK (0 to" \
       "$((NNODES - 1)), this node's) in the environment; without them torchrun waits for peers that never come" >&2
  exit 2
fi
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-300}
source "$REPO/scripts/pick_python.sh"
NPROC=${NPROC_PER_NODE:-8}
if [ -z "${WORKERS:-}" ]; then
  WORKERS=$(( $(nproc) / NPROC - 1 ))
  WORKERS=$(( WORKERS < 1 ? 1 : WORKERS > 8 ? 8 : WORKERS ))
fi
exec "$PYTHON" -m torch.distributed.run \
  --nproc_per_node="$NPROC" --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" \
  --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29500}" \
  "$REPO/train.py" --workers="$WORKERS" "$@"
