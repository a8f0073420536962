#!/usr/bin/env bash
# One-node CPU smoke run: 2 gloo ranks, tiny model, the embedded MNIST, a random tiny tokenizer (under a minute on a
# 2-core CPU, no GPU, no download). Checks the whole pipeline (data, DDP, schedules, validation, samples, checkpoints,
# resume).
# Usage: bash scripts/train_smoke_cpu.sh [more train.py flags]; run it twice to see the auto-resume.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
source scripts/pick_python.sh  # the launcher's python for the tokenizer below too
OUT="${OUT:-local_output/smoke_cpu}"
VAE="${VAE_CKPT:-$OUT/tiny_vae.pth}"
mkdir -p "$OUT"
if [ ! -f "$VAE" ]; then
  PYTHONPATH=. "$PYTHON" - "$VAE" <<'PY'
import dataclasses, sys, torch
from models.tokenizer import VQVAE
torch.manual_seed(0)
vae = VQVAE(vocab_size=256, z_channels=8, ch=32, ch_mult=(1, 2, 2), v_patch_nums=(1, 2, 3, 4))
torch.save({"vae_config": dataclasses.asdict(vae.config), "vae": vae.state_dict()}, sys.argv[1])
PY
fi
OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" NPROC_PER_NODE="${NPROC_PER_NODE:-2}" PYTHONPATH=. \
  exec scripts/torchrun.sh --dataset=mnist --vae_ckpt="$VAE" --pn=1_2_3_4 --depth=2 --embed_dim=64 --num_heads=2 \
  --fuse=0 --bs=32 --ep=2 --tblr=1e-2 --log_every=20 --save_every=50 --sample_every=1 --val_every=1 --workers=1 \
  --local_out_dir_path="$OUT" "$@"
