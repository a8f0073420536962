"""A newcomer's first run, on a CPU in minutes: embedded MNIST -> tokenizer -> M-VAR -> samples -> score.

1. trains VAR's multi-scale VQVAE tokenizer on the 4,500 training digits (16 px, 4x4 latent, scales 1_2_3_4;
   8 px with --quick),
2. trains a small M-VAR (intra-scale attention + Mamba2 blocks) on its tokens with train.py (bf16 autocast,
   `--fp16=2`, where the CPU has bf16 instructions: 1.3-1.6x the images per second of fp32 here),
3. samples every class and saves a grid (one row per class),
4. trains a small CNN on the real training labels and reports the fraction of generated images it assigns to the
   class that was asked for (class consistency), next to its accuracy on real and on tokenizer-reconstructed
   validation digits.

    python scripts/demo.py            # the full demo (`make demo`), about two minutes on 2 CPU cores (103-133 s)
    python scripts/demo.py --quick    # the same pipeline on 8 px digits, about a minute of one CPU thread; it
                                      # still learns them (tests use it)

Re-running with the same --out_dir resumes or reuses finished stages (the trainers auto-resume); a folder made with
other settings (the other preset, an older version) is refused.
"""
import argparse
import json
import logging
import time
from pathlib import Path

import torch

import tokenizer_trainer
import train
from models.loading import load_mvar, load_vae
from models.mvar import MVAR
from models.precision import effective_amp_dtype
from utils.data.loaders import build_datasets
from utils.evaluation.classifier import accuracy, predict, train_classifier
from utils.flags import DefaultsHelpFormatter, parse_args as parse_train_args, sampling_problems
from utils.run.checkpoint import LAST, write_text_atomic
from utils.run.log import setup_logging
from utils.run.rng import seed_problem
from utils.sample_io import save_grid, to_uint8_BHW3

logger = logging.getLogger("demo")

# flags every preset shares; a preset adds its image size, patch schedule and stage lengths
TOKENIZER_FLAGS = ["--ch=32", "--z_channels=16", "--vocab_size=512"]
MVAR_FLAGS = ["--alng=1e-3", "--sample_every=0", "--save_every_min=0", "--workers=0"]
# full demo: 16 px digits, a 4x tokenizer (4x4 latent), sized to finish in about two minutes on 2 cores with 96-98%
# class consistency (seeds 0-2; early codebook re-initialisation, every 25 steps, is what lets 250 tokenizer steps
# suffice); --quick: 8 px digits, a 2x tokenizer (the same 4x4 latent, so the same token count), long enough to learn
# the digits in about a minute of one CPU thread. mid_reso: resize to mid_reso*reso, then crop (1.0 at 8 px, where a
# one-pixel shift is an eighth of the digit)
PRESETS = {
    "full": dict(reso=16, pn="1_2_3_4", mid_reso=1.125,
                 tok=["--ch_mult=1_1_2", "--steps=250", "--bs=32", "--lr=2e-3", "--reinit_every=25", "--log_every=50"],
                 mvar=["--depth=2", "--embed_dim=128", "--bs=64", "--ep=4", "--tlr=3e-3", "--fp16=2", "--log_every=35",
                       "--val_every=4"],
                 clf_epochs=3, per_class=50),
    "quick": dict(reso=8, pn="1_2_3_4", mid_reso=1.0,
                  tok=["--ch_mult=1_1", "--steps=200", "--bs=32", "--lr=3e-3", "--reinit_every=100",
                       "--log_every=50"],
                  mvar=["--depth=1", "--embed_dim=128", "--bs=64", "--ep=2", "--tlr=4e-3", "--fp16=2", "--log_every=35",
                        "--val_every=2"],
                  clf_epochs=2, per_class=10),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=DefaultsHelpFormatter, allow_abbrev=False)
    p.add_argument("--quick", action="store_true", help="8 px digits, shorter stages (about a minute of CPU): "
                   "checks the whole pipeline, which still learns")
    p.add_argument("--out_dir", default=None, help="output folder, reused by a re-run; none = local_output/demo "
                   "(local_output/demo-quick with --quick)")
    p.add_argument("--cfg", type=float, default=1.5, help="classifier-free guidance of the samples")
    p.add_argument("--grid_cols", type=int, default=10, help="samples per class shown in the grid")
    p.add_argument("--seed", type=int, default=0, help="seed of every stage")
    return p


def sample_digits(mvar: MVAR, label_B: torch.Tensor, args: argparse.Namespace,
                  dtype: torch.dtype | None) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] of the classes `label_B`, in fp32 (dtype None) or `dtype`."""
    with torch.inference_mode(), mvar.inference_precision(dtype):
        return mvar.autoregressive_infer_cfg(len(label_B), label_B, g_seed=args.seed, cfg=args.cfg, top_k=0,
                                             top_p=0.96).float()


class Stages:
    """Numbered progress lines with the time since the start."""

    def __init__(self, n: int):
        self.n, self.i, self.t0 = n, 0, time.time()

    def start(self, what: str) -> None:
        self.i += 1
        logger.info("==== [%d/%d] %s (%.0fs elapsed)", self.i, self.n, what, time.time() - self.t0)

    def elapsed(self) -> float:
        return time.time() - self.t0


def flag_problems(args: argparse.Namespace) -> list[str]:
    """What is wrong with the flags, said before any stage trains (--grid_cols=0 failed at the grid, minutes in)."""
    problems = [f"--grid_cols must be >= 1, got {args.grid_cols}"] if args.grid_cols < 1 else []
    return problems + sampling_problems(args.cfg, 0, 0.96) + [p for p in (seed_problem(args.seed),) if p]


def check_folder(out: Path, preset: dict) -> None:
    """Refuse a folder holding a demo made with other settings (the other preset, or an older version's): its
    checkpoints would be resumed into models of another shape. Records the settings in a new folder."""
    path, wanted = out / "demo_settings.json", json.loads(json.dumps(preset))
    found = json.loads(path.read_text()) if path.is_file() else None
    if found != wanted and (found is not None or (out / "tokenizer").exists()):
        raise ValueError(f"{out} holds a demo made with other settings (another preset or an older version of this "
                         f"script): delete that folder or choose another --out_dir")
    if found is None:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(wanted, indent=1))


def main(args: argparse.Namespace) -> dict:
    """Run the demo; returns the summary that is also written to out_dir/summary.json."""
    out = Path(args.out_dir or ("local_output/demo-quick" if args.quick else "local_output/demo"))
    preset = PRESETS["quick" if args.quick else "full"]
    if problems := flag_problems(args):
        raise ValueError("; ".join(problems))
    check_folder(out, preset)
    setup_logging(0, out)
    stages = Stages(4)

    stages.start("training the tokenizer (multi-scale VQVAE) on embedded MNIST")
    tok_dir = out / "tokenizer"
    data_flags = ["--dataset=mnist", f"--pn={preset['pn']}", f"--mid_reso={preset['mid_reso']}"]
    tok_args = tokenizer_trainer.build_parser().parse_args(TOKENIZER_FLAGS + data_flags + preset["tok"] + [
        f"--reso={preset['reso']}", f"--out_dir={tok_dir}", f"--seed={args.seed}"])
    tok_ckpt = tokenizer_trainer.train(tok_args)

    setup_logging(0, out)
    stages.start("training M-VAR on the tokenizer's codes (train.py)")
    mvar_dir = out / "mvar"
    train.main(parse_train_args(MVAR_FLAGS + data_flags + preset["mvar"] + [
        f"--vae_ckpt={tok_ckpt}", f"--local_out_dir_path={mvar_dir}", f"--seed={args.seed}"]))
    mvar_ckpt = mvar_dir / LAST

    setup_logging(0, out)
    stages.start("sampling every class")
    vae = load_vae(mvar_ckpt)
    mvar = load_mvar(mvar_ckpt, vae=vae)
    num_classes, train_set, val_set = build_datasets("", "mnist", preset["reso"], preset["mid_reso"])
    per_class = max(preset["per_class"], args.grid_cols)
    label_B = torch.arange(num_classes).repeat_interleave(per_class)
    img_B3HW = sample_digits(mvar, label_B, args, None)
    # bf16 (where this CPU has bf16 instructions): the same seed, scored beside fp32 below
    img_bf16_B3HW = sample_digits(mvar, label_B, args, torch.bfloat16) \
        if effective_amp_dtype(torch.device("cpu"), torch.bfloat16) else None
    cols = min(args.grid_cols, per_class)
    shown = torch.arange(per_class)[:cols].repeat(num_classes) + torch.arange(num_classes).repeat_interleave(cols) \
        * per_class
    grid = save_grid(to_uint8_BHW3(img_B3HW[shown]), out / "demo_grid.png", ncol=cols)
    logger.info("saved %s: row c shows %d samples of digit c (cfg %.1f)", grid, cols, args.cfg)

    stages.start("scoring class consistency with a small CNN trained on the real labels")
    classifier = train_classifier(train_set, num_classes, epochs=preset["clf_epochs"], seed=args.seed)
    real_acc = accuracy(classifier, val_set)
    with torch.no_grad():
        val_img = torch.stack([val_set[i][0] for i in range(len(val_set))])
        rec_img = vae.img_to_reconstructed_img(val_img, last_one=True)
    rec_acc = (predict(classifier, rec_img) == torch.tensor(val_set.targets)).float().mean().item()
    hit_B = (predict(classifier, img_B3HW * 2 - 1) == label_B).float()  # generated images are in [0, 1]
    consistency, per_digit = hit_B.mean().item(), hit_B.view(num_classes, per_class).mean(1)
    consistency_bf16 = None if img_bf16_B3HW is None else \
        (predict(classifier, img_bf16_B3HW * 2 - 1) == label_B).float().mean().item()

    summary = {
        "class_consistency": consistency, "class_consistency_bf16": consistency_bf16,
        "classifier_val_acc_real": real_acc,
        "classifier_val_acc_reconstructed": rec_acc, "n_generated": len(label_B),
        "per_class_consistency": [round(v, 3) for v in per_digit.tolist()], "wall_time_s": round(stages.elapsed()),
        "grid": str(grid), "tokenizer_ckpt": str(tok_ckpt), "mvar_ckpt": str(mvar_ckpt), "quick": args.quick,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    logger.info("==== done in %.0fs", stages.elapsed())
    logger.info("class consistency: %.1f%% of %d generated digits are classified as the class asked for "
                "(per digit %s)", 100 * consistency, len(label_B), summary["per_class_consistency"])
    if consistency_bf16 is not None:
        logger.info("sampled in bf16 with the same seed: class consistency %.1f%%", 100 * consistency_bf16)
    logger.info("the classifier: %.1f%% on real validation digits, %.1f%% on their tokenizer reconstructions",
                100 * real_acc, 100 * rec_acc)
    logger.info("outputs: grid %s | M-VAR checkpoint %s | tokenizer %s | logs %s/log.txt, %s/log.txt | %s",
                grid, mvar_ckpt, tok_ckpt, tok_dir, mvar_dir, out / "summary.json")
    logger.info("more samples: python sample.py --ckpt=%s --classes 0 1 2 3 4 5 6 7 8 9 --num_per_class=8 "
                "--cfg=%g --top_k=0 --out=samples.png", mvar_ckpt, args.cfg)
    return summary


if __name__ == "__main__":
    try:
        main(build_parser().parse_args())
    except ValueError as e:  # a folder of another demo's: one line, as the other scripts' refusals
        raise SystemExit(f"error: {e}") from e
