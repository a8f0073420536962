#!/usr/bin/env bash
# M-VAR-d24, 512 px (paper Table 2). No official command: VAR's d24 hyperparameters with --pn=512 (our choice).
# Usage: NNODES=.. NODE_RANK=.. MASTER_ADDR=.. bash scripts/train_d24_512.sh --data_path=/path/to/imagenet [more flags]
exec "$(dirname "$0")/torchrun.sh" --depth=24 --pn=512 --bs=768 --ep=350 --tblr=8e-5 --fp16=1 --alng=1e-4 --wpe=0.01 "$@"
