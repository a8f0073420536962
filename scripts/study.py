"""The paper's ablations at laptop scale (Tables 5-6, Figure 5) on Fashion-MNIST, from nothing to a report.

Stages (each resumable: a re-run skips what is finished and continues what was interrupted):
1. tokenizer: VAR's multi-scale VQVAE on the 60,000 training images (32 px, 8x8 latent, scales 1_2_3_4_5_6_8:
   L = 155 tokens, so intra-scale attention sees 27% of the global attention's score entries, 24% at 256 px);
2. classifier: a small CNN on the real training labels (class consistency, and the feature space of FD_clf);
3. jobs, `--jobs` at a time, one CPU thread each: the reference sets (the training set = the floor, its tokenizer
   reconstructions = the ceiling) and every model x seed: train.py with one recipe and one budget (equal training
   images), then `--num_samples` images with the paper's sampling settings (cfg 1.5, top-p 0.96, top-k 900/4096
   of the vocabulary);
4. scores against the 10,000 test images (utils.sample_metrics) and the report: a markdown table and PNG plots.

    python scripts/study.py --report_dir docs          # the full study (about 1.5 h on 2 CPU cores)
    python scripts/study.py --quick                    # the same pipeline at 16 px in a few minutes (CI)
"""
import argparse
import json
import logging
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

import tokenizer_trainer
import train
from models.loading import load_mvar, load_vae
from models.mvar import MVAR, MVARConfig
from models.precision import effective_amp_dtype
from utils import benchmark
from utils.args import parse_args as parse_train_args
from utils.checkpoint import LAST
from utils.data import build_datasets
from utils.digit_classifier import SmallCNN, accuracy, train_classifier
from utils.image_grid import to_uint8_BHW3
from utils.inception import load_inception
from utils.logging_utils import setup_logging
from utils.registry import ARCH_BRANCHES
from utils.sample_metrics import classifier_scores, classifier_view, inception_fid, inception_stats
from utils.study_report import write_report

logger = logging.getLogger("study")

PRESETS = {
    # ~1.5 h on 2 cores: every row x 2 seeds, 9,600 training images each (150 steps of 64)
    "full": dict(reso=32, pn="1_2_3_4_5_6_8", tok=["--ch_mult=1_2_2", "--steps=500", "--bs=64"], clf_epochs=2,
                 depth=4, width=128, heads=2, train_limit=3200, ep=3, bs=64, val_limit=1000, num_samples=5000,
                 real_n=10000, inception_n=500, seeds=2),
    # the same pipeline at 16 px with tiny stages: checks it end to end (tests/test_study.py)
    "quick": dict(reso=16, pn="1_2_3_4_5_6_8", tok=["--ch_mult=1_2", "--steps=40", "--bs=32"], clf_epochs=1,
                  depth=2, width=64, heads=1, train_limit=256, ep=2, bs=32, val_limit=64, num_samples=100,
                  real_n=500, inception_n=10, seeds=1),
}
TRAIN_FLAGS = ["--dataset=fmnist", "--mid_reso=1.0", "--tlr=1e-3", "--alng=1e-3", "--fp16=2", "--sample_every=0",
               "--save_every_min=0", "--val_every=1", "--log_every=10", "--workers=0"]
SAMPLING = dict(cfg=1.5, top_p=0.96, top_k_of_4096=900, more_smooth=False)  # the paper's FID settings
SAMPLE_BATCH = 250


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    p.add_argument("--quick", action="store_true", help="16 px, tiny stages, one seed: the pipeline in minutes")
    p.add_argument("--out_dir", default=None, help="work folder (reused by a re-run); none = local_output/study "
                   "(local_output/study-quick with --quick)")
    p.add_argument("--report_dir", default=None, help="where study.md and its PNGs go; none = OUT_DIR/report")
    p.add_argument("--jobs", type=int, default=2, help="training/sampling/scoring jobs at once, one CPU thread each")
    p.add_argument("--seeds", type=int, default=None, help="seeds per row (default: the preset's)")
    p.add_argument("--num_samples", type=int, default=None, help="generated images per model (default: the "
                   "preset's; a multiple of 10)")
    p.add_argument("--inception_n", type=int, default=None, help="images per set in the Inception FID (first seed "
                   "only; 0 = skip; default: the preset's)")
    p.add_argument("--fmnist_dir", default="", help="Fashion-MNIST's IDX folder (see train.py --fmnist_dir)")
    p.add_argument("--inception", default=None, help="Inception TorchScript file (default: utils.inception's search)")
    p.add_argument("--job", default=None, help=argparse.SUPPRESS)  # internal: run one job of OUT_DIR/plan.json
    return p


# ----------------------------------------------------------------------------------------------------------------
# The plan: rows, runs and settings, written once to plan.json (jobs read it)
# ----------------------------------------------------------------------------------------------------------------
def count_params(depth: int, width: int, heads: int, arch: str, V: int, pn: tuple[int, ...], var_blocks: int = 0
                 ) -> int:
    config = MVARConfig(depth=depth, embed_dim=width, num_heads=heads, arch=arch, var_blocks=var_blocks, V=V,
                        Cvae=16, num_classes=10, patch_nums=pn)
    with torch.device("meta"):
        return sum(p.numel() for p in MVAR(config).parameters())


def study_rows(depth: int, width: int, heads: int, V: int, pn: tuple[int, ...]) -> dict[str, dict]:
    """name -> {label, flags}: the paper's four block types at one size (Table 6), M-VAR narrower (W) or shallower
    (D) at VAR's parameter count (Table 5), and VAR with its second half replaced by M-VAR blocks (Figure 5)."""
    var_params = count_params(depth, width, heads, "var", V, pn)
    widths = [w for w in range(32, width + 1, 32) if w % heads == 0]  # Mamba2 heads are 64 wide (d_inner = 2w)
    w_width = min(widths, key=lambda w: abs(count_params(depth, w, heads, "mvar", V, pn) - var_params))
    d_depth = min(range(1, depth + 1), key=lambda d: abs(count_params(d, width, heads, "mvar", V, pn) - var_params))
    size = dict(depth=depth, embed_dim=width)
    rows = {
        "var": dict(label="VAR", arch="var", **size),
        "intra": dict(label="intra-scale attn only", arch="intra", **size),
        "mamba": dict(label="Mamba2 only", arch="mamba", **size),
        "mvar": dict(label="M-VAR", arch="mvar", **size),
        "mvar-w": dict(label=f"M-VAR-W (width {w_width})", arch="mvar", depth=depth, embed_dim=w_width),
        "mvar-d": dict(label=f"M-VAR-D (depth {d_depth})", arch="mvar", depth=d_depth, embed_dim=width),
        "var-half": dict(label=f"{depth // 2} VAR + {depth - depth // 2} M-VAR blocks", arch="mvar",
                         var_blocks=depth // 2, **size),
    }
    for row in rows.values():
        row["params"] = count_params(row["depth"], row["embed_dim"], heads, row["arch"], V, pn,
                                     row.get("var_blocks", 0))
        row["flags"] = [f"--{k}={row[k]}" for k in ("arch", "depth", "embed_dim")] + [f"--num_heads={heads}"] + \
            ([f"--var_blocks={row['var_blocks']}"] if "var_blocks" in row else [])
    return rows


def make_plan(args: argparse.Namespace, out: Path, tok_ckpt: Path, V: int) -> dict:
    preset = dict(PRESETS["quick" if args.quick else "full"])
    for key in ("seeds", "num_samples", "inception_n"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    if preset["num_samples"] < 10 or preset["num_samples"] % 10:
        raise ValueError(f"--num_samples={preset['num_samples']}: expected a positive multiple of 10 (classes)")
    pn = tuple(int(s) for s in preset["pn"].split("_"))
    rows = study_rows(preset["depth"], preset["width"], preset["heads"], V, pn)
    runs = {f"{row}-s{seed}": dict(row=row, seed=seed) for seed in range(preset["seeds"]) for row in rows}
    data = [f"--pn={preset['pn']}", f"--train_limit={preset['train_limit']}", f"--val_limit={preset['val_limit']}",
            f"--ep={preset['ep']}", f"--bs={preset['bs']}", f"--vae_ckpt={tok_ckpt}"] + \
        ([f"--fmnist_dir={args.fmnist_dir}"] if args.fmnist_dir else [])
    return dict(preset=preset, rows=rows, runs=runs, train_flags=TRAIN_FLAGS + data, tokenizer=str(tok_ckpt),
                sampling=dict(SAMPLING, top_k=round(SAMPLING["top_k_of_4096"] * V / 4096)), quick=args.quick,
                fmnist_dir=args.fmnist_dir, inception=args.inception)


# ----------------------------------------------------------------------------------------------------------------
# Jobs (run as `study.py --out_dir OUT --job KIND:NAME` in a subprocess, one CPU thread)
# ----------------------------------------------------------------------------------------------------------------
def real_images(plan: dict, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The first `real_n` images of a Fashion-MNIST split as the models see them (resized, uint8) and labels."""
    preset = plan["preset"]
    _, train_set, val_set = build_datasets("", "fmnist", preset["reso"], 1.0, fmnist_dir=plan["fmnist_dir"] or None)
    ds = train_set if split == "train" else val_set
    n = min(preset["real_n"], len(ds))
    x_N3HW = torch.stack([ds[i][0] for i in range(n)])
    return to_uint8_BHW3((x_N3HW + 1) / 2), np.array([ds[i][1] for i in range(n)])


def job_reference(out: Path, plan: dict) -> None:
    """The test set (what every set is scored against), the training set (floor) and its reconstructions
    (ceiling), saved as image sets."""
    test, test_labels = real_images(plan, "val")
    np.savez(out / "sets" / "test.npz", images=test, labels=test_labels)
    train_imgs, train_labels = real_images(plan, "train")
    np.savez(out / "sets" / "floor.npz", images=train_imgs, labels=train_labels)
    vae = load_vae(plan["tokenizer"])
    with torch.no_grad():
        rec = [to_uint8_BHW3(vae.img_to_reconstructed_img(torch.from_numpy(chunk).permute(0, 3, 1, 2).float()
                                                          / 127.5 - 1, last_one=True).add(1).div(2))
               for chunk in np.array_split(train_imgs, max(1, len(train_imgs) // 500))]
    np.savez(out / "sets" / "ceiling.npz", images=np.concatenate(rec), labels=train_labels)


def job_model(out: Path, plan: dict, name: str) -> None:
    """Train one model x seed (train.py, auto-resuming), then sample `num_samples` images and time both."""
    run, preset = plan["runs"][name], plan["preset"]
    row = plan["rows"][run["row"]]
    run_dir = out / "runs" / name
    train.main(parse_train_args(plan["train_flags"] + row["flags"] + [
        f"--seed={run['seed']}", f"--local_out_dir_path={run_dir}"]))
    ckpt = run_dir / LAST
    vae = load_vae(ckpt)
    mvar = load_mvar(ckpt, vae=vae).eval()
    n, s = preset["num_samples"], plan["sampling"]
    labels = np.repeat(np.arange(10), n // 10)
    dtype = effective_amp_dtype(torch.device("cpu"), torch.bfloat16)
    t0, images = time.time(), []
    with torch.inference_mode(), mvar.inference_precision(dtype):
        for b, start in enumerate(range(0, n, SAMPLE_BATCH)):
            label_B = torch.from_numpy(labels[start:start + SAMPLE_BATCH])
            img = mvar.autoregressive_infer_cfg(len(label_B), label_B, g_seed=1000 * run["seed"] + b, cfg=s["cfg"],
                                                top_k=s["top_k"], top_p=s["top_p"], more_smooth=s["more_smooth"])
            images.append(to_uint8_BHW3(img))
    sample_s = time.time() - t0
    flops = model_flops(mvar, s)
    np.savez(out / "sets" / f"{name}.npz", images=np.concatenate(images), labels=labels)
    (run_dir / "timing.json").write_text(json.dumps(dict(
        sample_images_per_s=n / sample_s, sample_precision=str(dtype or torch.float32), **flops), indent=2))


def model_flops(mvar: MVAR, s: dict) -> dict[str, float]:
    """Model FLOPs (linear layers + attention scores, utils.benchmark) per training image (3x the forward pass)
    and per generated image (sampling with cfg: two sequences)."""
    label_B = torch.arange(10)
    x_BLC = torch.randn(10, sum(p * p for p in mvar.patch_nums) - 1, mvar.Cvae)
    with torch.no_grad():
        fwd = benchmark.model_flops(mvar, lambda: mvar(label_B, x_BLC)) / 10
    with torch.inference_mode():
        gen = benchmark.model_flops(mvar, lambda: mvar.autoregressive_infer_cfg(
            10, label_B, g_seed=0, cfg=s["cfg"], top_k=s["top_k"], top_p=s["top_p"])) / 10
    return dict(train_flops_per_image=3 * fwd, sample_flops_per_image=gen)


def job_score(out: Path, plan: dict, name: str) -> None:
    """Scores of one image set against the test set; the Inception FID only for seed 0 and the reference sets."""
    classifier = SmallCNN(10)
    classifier.load_state_dict(torch.load(out / "classifier.pt", weights_only=True))
    test = np.load(out / "sets" / "test.npz")
    sample = np.load(out / "sets" / f"{name}.npz")
    scores = classifier_scores(classifier_view(classifier, sample["images"]), sample["labels"],
                               classifier_view(classifier, test["images"]))
    n_inc = plan["preset"]["inception_n"]
    if n_inc > 0 and plan["runs"].get(name, {}).get("seed", 0) == 0:
        inception = load_inception(plan["inception"])
        ref_mu, ref_sigma = inception_stats(inception, test["images"][:n_inc])
        scores["fid_inception"] = inception_fid(inception, spread_over_classes(sample["images"], n_inc), ref_mu,
                                                ref_sigma)
    bad = [k for k, v in scores.items() if not np.isfinite(v)]
    if bad:
        raise RuntimeError(f"{name}: non-finite scores {bad}: the image set {out / 'sets' / name}.npz is broken")
    (out / "scores" / f"{name}.json").write_text(json.dumps(scores, indent=2))


def spread_over_classes(images: np.ndarray, n: int) -> np.ndarray:
    """`n` images taken evenly over a set (generated sets are sorted by class; real ones are shuffled)."""
    return images[np.linspace(0, len(images) - 1, n).round().astype(int)]


JOBS = {"reference": job_reference, "model": job_model, "score": job_score}


def relative_cost(row: dict) -> float:
    """A rough relative cost of training and sampling a row on the CPU (the Mamba2 scan doubles a block's cost),
    to start the slowest jobs first so that the last job running alone is a short one."""
    return row["params"] * (2 if "mamba" in ARCH_BRANCHES[row["arch"]] else 1)


def run_job_subprocess(out: Path, job: str) -> None:
    """One job in a fresh one-thread process, its output in OUT/logs/; a failure raises naming the log."""
    log = out / "logs" / f"{job.replace(':', '_')}.log"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    t0 = time.time()
    with open(log, "a") as f:
        code = subprocess.call([sys.executable, __file__, f"--out_dir={out}", f"--job={job}"], stdout=f,
                               stderr=subprocess.STDOUT, env=env)
    if code:
        raise RuntimeError(f"study job {job} failed (exit {code}); see {log}")
    logger.info("job %s done in %.0fs", job, time.time() - t0)


def run_parallel(out: Path, jobs: list[str], parallel: int) -> None:
    """Run `jobs` (longest first as listed), `parallel` at a time; raise after all ran if any failed."""
    with ThreadPoolExecutor(parallel) as pool:
        futures = {job: pool.submit(run_job_subprocess, out, job) for job in jobs}
    failed = [str(f.exception()) for f in futures.values() if f.exception() is not None]
    if failed:
        raise RuntimeError("\n".join(failed))


# ----------------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------------
def prepare(args: argparse.Namespace, out: Path) -> dict:
    """Tokenizer and classifier (in this process), then the plan; reuses what a previous run finished."""
    preset = PRESETS["quick" if args.quick else "full"]
    fmnist = [f"--fmnist_dir={args.fmnist_dir}"] if args.fmnist_dir else []
    tok_args = tokenizer_trainer.build_parser().parse_args(preset["tok"] + fmnist + [
        "--dataset=fmnist", f"--reso={preset['reso']}", "--mid_reso=1.0", f"--pn={preset['pn']}", "--vocab_size=512",
        "--z_channels=16", "--ch=32", f"--out_dir={out / 'tokenizer'}", "--seed=0", "--log_every=50"])
    tok_ckpt = tokenizer_trainer.train(tok_args)
    setup_logging(0, out)
    clf_path = out / "classifier.pt"
    if not clf_path.is_file():
        _, train_set, val_set = build_datasets("", "fmnist", preset["reso"], 1.0, fmnist_dir=args.fmnist_dir or None)
        classifier = train_classifier(train_set, 10, epochs=preset["clf_epochs"], seed=0)
        (out / "classifier.json").write_text(json.dumps({"test_accuracy": accuracy(classifier, val_set)}))
        torch.save(classifier.state_dict(), clf_path)
    plan = make_plan(args, out, tok_ckpt, tok_args.vocab_size)
    plan_path = out / "plan.json"
    if plan_path.is_file() and json.loads(plan_path.read_text()) != json.loads(json.dumps(plan)):
        raise ValueError(f"{plan_path} was written with other settings; use another --out_dir or delete it")
    plan_path.write_text(json.dumps(plan, indent=2))
    return plan


def main(args: argparse.Namespace) -> Path:
    """Run the study; returns the report's path."""
    out = Path(args.out_dir or ("local_output/study-quick" if args.quick else "local_output/study"))
    for sub in ("sets", "scores", "runs", "logs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    if args.job:
        kind, _, name = args.job.partition(":")
        setup_logging(0, None)
        torch.set_num_threads(1)
        JOBS[kind](out, json.loads((out / "plan.json").read_text()), *([name] if name else []))
        return out
    if args.jobs < 1:
        raise ValueError(f"--jobs={args.jobs}: expected at least 1")
    setup_logging(0, out)
    t0 = time.time()
    plan = prepare(args, out)
    order = sorted(plan["runs"], key=lambda r: (plan["runs"][r]["seed"], -relative_cost(plan["rows"][plan["runs"][r]
                                                                                                  ["row"]])))
    todo = [f"model:{r}" for r in order if not (out / "sets" / f"{r}.npz").is_file()]
    if not (out / "sets" / "ceiling.npz").is_file():
        todo.insert(0, "reference")
    run_parallel(out, todo, args.jobs)
    sets = ["floor", "ceiling", *order]
    run_parallel(out, [f"score:{s}" for s in sets if not (out / "scores" / f"{s}.json").is_file()], args.jobs)
    wall = time.time() - t0
    timing_path = out / "wall_time.json"  # summed over re-runs
    total = json.loads(timing_path.read_text())["seconds"] if timing_path.is_file() else 0.0
    timing_path.write_text(json.dumps({"seconds": total + wall}))
    report = write_report(out, Path(args.report_dir) if args.report_dir else out / "report", plan, total + wall,
                          " ".join(["python scripts/study.py", *sys.argv[1:]]))
    logger.info("study done in %.0f min; report %s", (total + wall) / 60, report)
    return report


if __name__ == "__main__":
    main(build_parser().parse_args())
