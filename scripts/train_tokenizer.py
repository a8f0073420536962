"""Train VAR's multi-scale VQVAE tokenizer (flags: --help; the training itself is tokenizer_trainer.py).

  python scripts/train_tokenizer.py --dataset=mnist        # embedded MNIST at 32 px, 4x4 latent
  torchrun --nproc_per_node=8 scripts/train_tokenizer.py --data_path=/data/imagenet --reso=256 \
      --ch=160 --ch_mult=1_1_2_2_4 --vocab_size=4096 --z_channels=32 --pn=256 --bs=256 --w_gan=0.1
"""
from dist import run_then_finalize
from tokenizer_trainer import build_parser, train
from utils.run.divergence import NonFiniteError
from utils.run.checkpoint import CheckpointError, OutputFolderError
from utils.run.lock import RunLockError

if __name__ == "__main__":
    try:
        run_then_finalize(train, build_parser().parse_args())
    except (ValueError, FileNotFoundError, CheckpointError, OutputFolderError, RunLockError, NonFiniteError) as e:
        # a flag, data folder or checkpoint that does not fit (DataError is a ValueError), or a run gone non-finite
        raise SystemExit(f"error: {e}") from e
