#!/usr/bin/env bash
# M-VAR-d30, 256 px: the official recipe (M-VAR README). Out of memory: add --grad_ckpt=1 and/or --ac=K
# (activations), --fsdp=1 (weights and AdamW states); see scripts/torchrun.sh.
# Usage: NNODES=.. NODE_RANK=.. MASTER_ADDR=.. bash scripts/train_d30.sh --data_path=/path/to/imagenet [more flags]
exec "$(dirname "$0")/torchrun.sh" --depth=30 --bs=1024 --ep=350 --tblr=8e-5 --fp16=1 --alng=1e-5 --wpe=0.01 --twde=0.08 "$@"
