#!/usr/bin/env bash
# d36-s, 512 px: VAR's recipe verbatim (shared adaLN). Pass --arch=var for the VAR baseline; --fsdp=1 for M-VAR.
# Usage: NNODES=.. NODE_RANK=.. MASTER_ADDR=.. bash scripts/train_d36s_512.sh --data_path=/path/to/imagenet [more flags]
exec "$(dirname "$0")/torchrun.sh" --depth=36 --saln=1 --pn=512 --bs=768 --ep=350 --tblr=8e-5 --fp16=1 --alng=5e-6 --wpe=0.01 --twde=0.08 "$@"
