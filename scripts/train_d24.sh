#!/usr/bin/env bash
# M-VAR-d24, 256 px: the official recipe (M-VAR README).
# Usage: NNODES=.. NODE_RANK=.. MASTER_ADDR=.. bash scripts/train_d24.sh --data_path=/path/to/imagenet [more flags]
exec "$(dirname "$0")/torchrun.sh" --depth=24 --bs=768 --ep=350 --tblr=8e-5 --fp16=1 --alng=1e-4 --wpe=0.01 "$@"
