#!/usr/bin/env bash
# M-VAR-d20, 256 px: the official recipe (M-VAR README).
# Usage: NNODES=.. NODE_RANK=.. MASTER_ADDR=.. bash scripts/train_d20.sh --data_path=/path/to/imagenet [more flags]
exec "$(dirname "$0")/torchrun.sh" --depth=20 --bs=768 --ep=250 --fp16=1 --alng=1e-3 --wpe=0.1 "$@"
