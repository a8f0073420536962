"""The paper's ablations at laptop scale (Tables 5-6, Figure 5) on Fashion-MNIST, from nothing to a report.

Stages (each resumable: a re-run skips what is finished and continues what was interrupted):
1. tokenizer: VAR's multi-scale VQVAE on the 60,000 training images (32 px, 8x8 latent, scales 1_2_3_4_5_6_8:
   L = 155 tokens, so intra-scale attention sees 27% of the global attention's score entries, 24% at 256 px);
   then the token ids of the images the runs train on (scripts/extract_tokens.py: the runs train from them);
2. classifier: a small CNN on the real training labels (class consistency, and the feature space of FD_clf);
3. reference sets, scored against the 10,000 test images (utils.evaluation.scores): the training set (the floor)
   and its tokenizer reconstructions (the ceiling any generator on this tokenizer can reach);
4. one job per model x seed, `--jobs` at a time, one CPU thread each: train.py with one recipe (and one budget of
   training images, except --curves, where VAR trains twice as long), `--num_samples` images with the paper's
   sampling settings (cfg 1.5, top-p 0.96, top-k 900/4096 of the vocabulary), their scores;
5. the report: a markdown table, an automatic reading of it and PNG plots (scripts.study_report).

    python scripts/study.py --curves --report_dir docs               # learning curves (make study; see README)
    python scripts/study.py --report_dir docs/study-early            # every row at 9,600 images (~1.5 h, 2 cores)
    python scripts/study.py --quick                                  # the pipeline at 16 px in minutes (CI)
"""
import argparse
import json
import logging
import math
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

import tokenizer_trainer
import train
from models.flops import COUNT_VERSION, model_flops, train_step_flops
from models.loading import CheckpointError, load_checkpoint, load_mvar, load_vae
from models.mvar import MVAR, MVARConfig
from models.precision import effective_amp_dtype
from models.presets import ARCH_BRANCHES
from scripts import extract_tokens
from scripts.study_report import write_report
from utils.data.embedded import fashion_mnist_dir
from utils.data.loaders import build_datasets
from utils.evaluation.classifier import SmallCNN, accuracy, train_classifier
from utils.evaluation.inception import find_inception, load_inception
from utils.evaluation.scores import classifier_scores, classifier_view, inception_features, inception_fid
from utils.flags import DefaultsHelpFormatter, parse_args as parse_train_args
from utils.run.checkpoint import LAST, check_writable, write_atomic, write_text_atomic
from utils.run.divergence import NonFiniteError
from utils.run.lock import RunLockError
from utils.run.log import setup_logging
from utils.sample_io import to_uint8_BHW3

logger = logging.getLogger("study")

# ~1.5 h on 2 cores: every row x 2 seeds, 9,600 training images each (150 steps of 64)
FULL = dict(reso=32, pn="1_2_3_4_5_6_8", tok=["--ch_mult=1_2_2", "--steps=500", "--bs=64", "--val_limit=1000"],
            clf_epochs=2, depth=4, width=128, heads=2, train_limit=3200, ep=3, bs=64, val_limit=1000, val_every=1,
            num_samples=5000, real_n=10000, inception_n=500, seeds=2, eval_every=0, eval_n=500)
PRESETS = {
    "full": FULL,
    # learning curves (--curves): M-VAR to 38,400 images, VAR to twice that (about M-VAR's CPU time), an evaluation
    # every epoch (3,200 images) and validation every second; the equal-parameter rows with one seed, compared at the
    # largest budget only: one evaluation, at their end
    "curves": dict(FULL, ep=12, eval_every=1, eval_n=500, val_every=2, rows=["var", "mvar", "mvar-w", "mvar-d"],
                   ep_scale={"var": 2}, row_seeds={"mvar-w": 1, "mvar-d": 1}, final_eval_rows=["mvar-w", "mvar-d"]),
    # the same pipeline at 16 px with tiny stages, curves included: checks it end to end (tests/test_study.py)
    "quick": dict(reso=16, pn="1_2_3_4_5_6_8", tok=["--ch_mult=1_2", "--steps=40", "--bs=32", "--val_limit=500"],
                  clf_epochs=2, clf_limit=10000,  # the classifier on the first 10,000 training images (full: all)
                  depth=2, width=64, heads=1, train_limit=128, ep=2, bs=32, val_limit=64, val_every=1,
                  num_samples=50, real_n=500, inception_n=10, seeds=1, eval_every=1, eval_n=20, ep_scale={"var": 2},
                  final_eval_rows=["intra", "mamba", "mvar-w", "mvar-d", "var-half"]),
}
FMNIST_TRAIN_IMAGES = 60_000
TOKENIZER = dict(vocab_size=512, z_channels=16, ch=32)
TRAIN_FLAGS = ["--dataset=fmnist", "--mid_reso=1.0", "--alng=1e-3", "--fp16=2", "--sample_every=0",
               "--save_every_min=0", "--log_every=10", "--workers=0"]
SAMPLING = dict(cfg=1.5, top_p=0.96, top_k_of_4096=900, more_smooth=False)  # the paper's FID settings
SAMPLE_BATCH = 250
BASE_SETTINGS = ("reso", "pn", "tok", "clf_epochs", "clf_limit", "real_n", "inception_n")  # what --base must share
ROWS = ("var", "intra", "mamba", "mvar", "mvar-w", "mvar-d", "var-half")  # study_rows' names, in report order
OVERRIDES = ("seeds", "first_seed", "num_samples", "inception_n", "ep", "train_limit", "depth", "width", "eval_every",
             "tlr")  # flags over the preset


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=DefaultsHelpFormatter, allow_abbrev=False)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="16 px, tiny stages, one seed: the pipeline in minutes")
    mode.add_argument("--curves", action="store_true", help="learning curves: evaluations inside longer runs, VAR "
                      "trained twice as long; verdicts at equal images, FLOPs and CPU time")
    p.add_argument("--out_dir", default=None, help="work folder (reused by a re-run); none = local_output/study "
                   "(local_output/study-quick with --quick)")
    p.add_argument("--report_dir", default=None, help="where study.md and its PNGs go; none = OUT_DIR/report")
    p.add_argument("--jobs", type=int, default=2, help="training/sampling/scoring jobs at once, one CPU thread each")
    p.add_argument("--base", default=None, help="reuse the tokenizer, classifier and reference sets of this finished "
                   "study folder (same data, tokenizer and scoring settings): other rows or budgets on the same "
                   "tokenizer, e.g. --base local_output/study --ep 12 --rows var mvar")
    p.add_argument("--rows", nargs="+", default=None, choices=ROWS, help="train only these rows (default: all)")
    g = p.add_argument_group("overrides of the preset (default: the preset's value)")
    g.add_argument("--seeds", type=int, default=None, help="seeds per row")
    g.add_argument("--first_seed", type=int, default=None, help="the rows' seeds start here (default 0; another "
                   "start gives held-out seeds, e.g. for choosing the recipe)")
    g.add_argument("--num_samples", type=int, default=None, help="generated images per model (a multiple of 10)")
    g.add_argument("--inception_n", type=int, default=None, help="images per set in the Inception FID (first seed "
                   "only; 0 = skip)")
    g.add_argument("--ep", type=int, default=None, help="training epochs over the --train_limit first images")
    g.add_argument("--train_limit", type=int, default=None, help="training images per epoch")
    g.add_argument("--depth", type=int, default=None, help="blocks of the VAR / M-VAR rows (M-VAR-D is shallower)")
    g.add_argument("--width", type=int, default=None, help="width of the VAR / M-VAR rows (M-VAR-W is narrower; "
                   "a multiple of 64)")
    g.add_argument("--eval_every", type=int, default=None, help="epochs between evaluations inside a run (0: none)")
    g.add_argument("--tlr", type=float, default=None, help="peak learning rate of every row (default 1e-3)")
    p.add_argument("--fmnist_dir", default="", help="Fashion-MNIST's IDX folder (see train.py --fmnist_dir)")
    p.add_argument("--inception", default=None, help="Inception TorchScript file (default: "
                   "utils.evaluation.inception's search)")
    return p


# ----------------------------------------------------------------------------------------------------------------
# The plan: rows, runs and settings, written once to plan.json (jobs read it)
# ----------------------------------------------------------------------------------------------------------------
def count_params(depth: int, width: int, heads: int, arch: str, V: int, pn: tuple[int, ...], var_blocks: int = 0
                 ) -> int:
    config = MVARConfig(depth=depth, embed_dim=width, num_heads=heads, arch=arch, var_blocks=var_blocks, V=V,
                        Cvae=TOKENIZER["z_channels"], num_classes=10, patch_nums=pn)
    with torch.device("meta"):
        return sum(p.numel() for p in MVAR(config).parameters())


def study_rows(depth: int, width: int, heads: int, V: int, pn: tuple[int, ...]) -> dict[str, dict]:
    """name -> {label, flags}: the paper's four block types at one size (Table 6), M-VAR narrower (W) or shallower
    (D) at VAR's parameter count (Table 5), and VAR with its second half replaced by M-VAR blocks (Figure 5)."""
    var_params = count_params(depth, width, heads, "var", V, pn)
    widths = [w for w in range(32, width, 32) if w % heads == 0]  # narrower; Mamba2 heads are 64 wide (d_inner 2w)
    w_width = min(widths, key=lambda w: abs(count_params(depth, w, heads, "mvar", V, pn) - var_params))
    d_depth = min(range(1, depth), key=lambda d: abs(count_params(d, width, heads, "mvar", V, pn) - var_params))
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


def study_preset(args: argparse.Namespace) -> dict:
    """The preset with the flags that override it, checked (before any work starts)."""
    preset = dict(PRESETS["quick" if args.quick else "curves" if args.curves else "full"], tlr=1e-3, first_seed=0)
    for key in OVERRIDES:
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    minimum = {"seeds": 1, "num_samples": 10, "inception_n": 0, "ep": 1, "train_limit": 1, "depth": 2, "width": 64,
               "eval_every": 0, "first_seed": 0}
    bad = [f"--{k}={preset[k]} (expected >= {m})" for k, m in minimum.items() if preset[k] < m]
    # the float flags: nan passed a `< minimum` test, inf trained every row at an infinite learning rate
    bad += [f"--{k}={preset[k]} (expected a finite value > 0)" for k in ("tlr",)
            if not (math.isfinite(preset[k]) and preset[k] > 0)]
    bad += [f"--{k}={preset[k]} (expected a multiple of {m})" for k, m in (("num_samples", 10), ("width", 64))
            if preset[k] % m]
    if preset["train_limit"] > FMNIST_TRAIN_IMAGES:  # the loader would take all, and the report count too many
        bad.append(f"--train_limit={preset['train_limit']} (Fashion-MNIST has {FMNIST_TRAIN_IMAGES:,} training "
                   f"images)")
    if bad:
        raise ValueError("bad study settings: " + ", ".join(bad))
    if preset["eval_every"] > preset["ep"]:
        logger.warning("--eval_every=%d > --ep=%d: the runs are never evaluated inside, so there are no curves",
                       preset["eval_every"], preset["ep"])
    if args.jobs < 1:
        raise ValueError(f"--jobs={args.jobs}: expected at least 1")
    if preset["inception_n"] != 0 and not 2 <= preset["inception_n"] <= min(preset["real_n"], preset["num_samples"]):
        raise ValueError(f"--inception_n={preset['inception_n']}: expected 0 (off) or 2 .. "
                         f"{min(preset['real_n'], preset['num_samples'])} (the test images and samples there are)")
    return preset


def make_plan(args: argparse.Namespace) -> dict:
    """What the results depend on (checked against a folder's plan.json before any work), without paths."""
    preset = study_preset(args)
    pn = tuple(int(s) for s in preset["pn"].split("_"))
    rows = study_rows(preset["depth"], preset["width"], preset["heads"], TOKENIZER["vocab_size"], pn)
    rows = {name: row for name, row in rows.items() if name in (args.rows or preset.get("rows", ROWS))}
    runs = {f"{row}-s{seed}": dict(row=row, seed=seed, ep=preset["ep"] * preset.get("ep_scale", {}).get(row, 1))
            for row in rows for seed in range(preset["first_seed"], preset["first_seed"] + min(
                preset["seeds"], preset.get("row_seeds", {}).get(row, preset["seeds"])))}
    for run in runs.values():  # epochs between evaluations; a row compared at its end only is evaluated once
        run["eval_every"] = run["ep"] if preset["eval_every"] and run["row"] in preset.get("final_eval_rows", ()) \
            else preset["eval_every"]
    sampling = dict(SAMPLING, top_k=round(SAMPLING["top_k_of_4096"] * TOKENIZER["vocab_size"] / 4096))
    recipe = dict(train_flags=TRAIN_FLAGS, tokenizer=TOKENIZER)  # compared too: a resume must not mix two recipes
    return dict(preset=preset, rows=rows, runs=runs, sampling=sampling, quick=args.quick, recipe=recipe)


def check_folder(out: Path, plan: dict) -> None:
    """A folder holding a study made with other settings is refused (its files would be silently reused)."""
    path = out / "plan.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if "recipe" not in old and "tokenizer_config" in old:  # a folder from before the recipe was compared
            old["recipe"] = dict(train_flags=old["train_flags"][:len(TRAIN_FLAGS)], tokenizer=old["tokenizer_config"])
        old.get("preset", {}).setdefault("eval_n", FULL["eval_n"])  # the default preset's, before it had one
        differ = [k for k in plan if old.get(k) != json.loads(json.dumps(plan[k]))]
        if differ:
            raise ValueError(f"{out} holds a study made with other settings ({', '.join(differ)} differ): run with "
                             f"its settings to resume it, or choose another --out_dir (or delete that folder)")


def save_json(obj: dict, path: Path) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2))


def save_set(path: Path, **arrays: np.ndarray) -> None:
    write_atomic(path, lambda f: np.savez(f, **arrays))


# ----------------------------------------------------------------------------------------------------------------
# Reference sets (in the driver) and model jobs (one process each, one thread: `run_parallel`)
# ----------------------------------------------------------------------------------------------------------------
def real_images(plan: dict, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The first `real_n` images of a Fashion-MNIST split as the models see them (resized, uint8) and labels."""
    preset = plan["preset"]
    _, train_set, val_set = build_datasets("", "fmnist", preset["reso"], 1.0, fmnist_dir=plan["fmnist_dir"] or None)
    ds = train_set if split == "train" else val_set
    items = [ds[i] for i in range(min(preset["real_n"], len(ds)))]
    return to_uint8_BHW3((torch.stack([x for x, _ in items]) + 1) / 2), np.array([y for _, y in items])


def reference_sets(out: Path, plan: dict) -> None:
    """The test set (what every set is scored against; its Inception statistics), the training set (the floor) and
    its tokenizer reconstructions (the ceiling), each saved and scored."""
    test, test_labels = real_images(plan, "val")
    save_set(out / "sets" / "test.npz", images=test, labels=test_labels)
    n_inc = plan["preset"]["inception_n"]
    inception = load_inception(plan["inception"]) if n_inc > 0 else None
    if inception is not None:
        save_set(out / "sets" / "test_inception.npz", feats=inception_features(inception, test[:n_inc]))
    train_imgs, train_labels = real_images(plan, "train")
    save_set(out / "sets" / "floor.npz", images=train_imgs, labels=train_labels)
    vae = load_vae(plan["tokenizer"])
    with torch.no_grad():
        rec = [to_uint8_BHW3(vae.img_to_reconstructed_img(torch.from_numpy(chunk).permute(0, 3, 1, 2).float()
                                                          / 127.5 - 1, last_one=True).add(1).div(2))
               for chunk in np.array_split(train_imgs, max(1, len(train_imgs) // 500))]
    save_set(out / "sets" / "ceiling.npz", images=np.concatenate(rec), labels=train_labels)
    for name in ("floor", "ceiling"):
        score_set(out, plan, name, inception=True, inception_net=inception)


def job_model(out: Path, plan: dict, name: str) -> None:
    """One model x seed: train (train.py, auto-resuming), sample and score (each step skipped when done)."""
    if not (out / "sets" / f"{name}.npz").is_file():
        train_and_sample(out, plan, name)
    score_set(out, plan, name, inception=plan["runs"][name]["seed"] == plan["preset"]["first_seed"])


def train_and_sample(out: Path, plan: dict, name: str) -> None:
    """Train one model x seed, then sample `num_samples` images with the paper's settings; time both."""
    run, preset = plan["runs"][name], plan["preset"]
    row = plan["rows"][run["row"]]
    run_dir = out / "runs" / name
    train.main(parse_train_args(plan["train_flags"] + row["flags"] + [
        f"--ep={run['ep']}", f"--eval_every={run['eval_every']}", f"--seed={run['seed']}",
        f"--local_out_dir_path={run_dir}"]))
    ckpt = run_dir / LAST
    save_json(load_checkpoint(ckpt).get("eval_history", []), run_dir / "curve.json")
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
    save_json(dict(sample_images_per_s=n / sample_s, sample_precision=str(dtype or torch.float32),
                   **flops_per_image(mvar, s)), run_dir / "timing.json")
    save_set(out / "sets" / f"{name}.npz", images=np.concatenate(images), labels=labels)  # last: marks it done


def recount_flops(out: Path, plan: dict, name: str) -> None:
    """Count the finished run `name`'s FLOPs again (timing.json) when they were counted by another version of
    models/flops.py: the curves' FLOP axis and the report's table then use today's count for every row."""
    path = out / "runs" / name / "timing.json"
    if not path.is_file():  # not sampled yet
        return
    timing = json.loads(path.read_text())
    if timing.get("flops_count") != COUNT_VERSION:
        ckpt = out / "runs" / name / LAST
        mvar = load_mvar(ckpt, vae=load_vae(ckpt)).eval()
        save_json({**timing, **flops_per_image(mvar, plan["sampling"])}, path)
        logger.info("%s: model FLOPs counted again (models/flops.py count %d, was %s)", name, COUNT_VERSION,
                    timing.get("flops_count", 1))


def flops_per_image(mvar: MVAR, s: dict) -> dict[str, float]:
    """Model FLOPs (models.flops: linear layers, attention scores, Mamba2 mixing) per training image (one training
    step's) and per generated image (sampling with cfg: two sequences), with the count's version."""
    label_B = torch.arange(10)
    x_BLC = torch.randn(10, mvar.L - mvar.first_l, mvar.Cvae)  # the teacher input: every scale after the first
    train = train_step_flops(mvar, label_B, x_BLC) / 10
    with torch.inference_mode():
        gen = model_flops(mvar, lambda: mvar.autoregressive_infer_cfg(
            10, label_B, g_seed=0, cfg=s["cfg"], top_k=s["top_k"], top_p=s["top_p"])) / 10
    return dict(train_flops_per_image=train, sample_flops_per_image=gen, flops_count=COUNT_VERSION)


def score_set(out: Path, plan: dict, name: str, inception: bool, inception_net: torch.nn.Module | None = None
              ) -> None:
    """Scores of the image set `name` against the test set, with the Inception FID when `inception` (with
    `inception_net` if given, else loaded here)."""
    classifier = SmallCNN(10)
    classifier.load_state_dict(torch.load(out / "classifier.pt", weights_only=True))
    test = np.load(out / "sets" / "test.npz")
    sample = np.load(out / "sets" / f"{name}.npz")
    scores = classifier_scores(classifier_view(classifier, sample["images"]), sample["labels"],
                               classifier_view(classifier, test["images"]))
    n_inc = plan["preset"]["inception_n"]
    if inception and n_inc > 0:
        ref = np.load(out / "sets" / "test_inception.npz")
        if "feats" not in ref:
            raise RuntimeError(f"{out / 'sets' / 'test_inception.npz'} holds Inception statistics (an older study.py)"
                               f", not features: delete it and {out / 'scores'} to rebuild the reference and scores")
        net = load_inception(plan["inception"]) if inception_net is None else inception_net
        scores["fid_inception"] = inception_fid(net, spread_over_classes(sample["images"], n_inc), ref["feats"])
    bad = [k for k, v in scores.items() if not np.isfinite(v)]
    if bad:
        raise RuntimeError(f"{name}: non-finite scores {bad}: the image set {out / 'sets' / name}.npz is broken")
    save_json(scores, out / "scores" / f"{name}.json")


def spread_over_classes(images: np.ndarray, n: int) -> np.ndarray:
    """`n` images taken evenly over a set (generated sets are sorted by class; real ones are shuffled)."""
    return images[np.linspace(0, len(images) - 1, n).round().astype(int)]


def relative_cost(row: dict, ep: int) -> float:
    """A rough relative cost of training a row for `ep` epochs and sampling it on the CPU (per parameter, a block
    with the Mamba2 scan takes about 1.5x as long, measured on the curves' runs), to start the slowest jobs first
    so that the last job running alone is a short one."""
    return row["params"] * ep * (1.5 if "mamba" in ARCH_BRANCHES[row["arch"]] else 1)


def job_order(plan: dict) -> list[str]:
    """The runs, costliest first (longest-processing-time order: the makespan of `--jobs` workers stays close to the
    total work over the workers)."""
    runs = plan["runs"]
    return sorted(runs, key=lambda r: -relative_cost(plan["rows"][runs[r]["row"]], runs[r]["ep"]))


def job_process(out: Path, job: str) -> None:
    """One job, in a child of the fork server: one thread, its output (stdout, stderr, logging) in OUT/logs/."""
    with open(out / "logs" / f"{job}.log", "a") as f:
        os.dup2(f.fileno(), sys.stdout.fileno())
        os.dup2(f.fileno(), sys.stderr.fileno())
    setup_logging(0, None)
    torch.set_num_threads(1)  # OpenMP and MKL
    job_model(out, json.loads((out / "plan.json").read_text()), job)


class StudyJobError(RuntimeError):
    """A study job (training, sampling, scoring a run) that failed; the message names its log."""


def run_job(server: multiprocessing.context.ForkServerContext, out: Path, job: str) -> None:
    """Run one job to its end; a failure raises naming its log."""
    t0 = time.time()
    proc = server.Process(target=job_process, args=(out, job), name=f"study-{job}")
    proc.start()
    proc.join()
    if proc.exitcode:
        raise StudyJobError(f"study job {job} failed (exit {proc.exitcode}); see {out / 'logs' / f'{job}.log'}")
    logger.info("job %s done in %.0fs", job, time.time() - t0)


def run_parallel(out: Path, jobs: list[str], parallel: int) -> None:
    """Run `jobs` (longest first as listed), `parallel` at a time; raise after all ran if any failed. Each job is a
    fresh process forked from a server that imported this script's modules once (torch, torchvision, the project:
    ~4 s a process), not from this process, whose thread pools have run."""
    server = multiprocessing.get_context("forkserver")
    server.set_forkserver_preload(["scripts.study"])  # by name: run as a script, this module is __main__
    with ThreadPoolExecutor(parallel) as pool:
        futures = {job: pool.submit(run_job, server, out, job) for job in jobs}
    failed = [str(f.exception()) for f in futures.values() if f.exception() is not None]
    if failed:
        raise StudyJobError("\n".join(failed))


# ----------------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------------
def base_settings(preset: dict) -> dict:
    """What a --base study must share (BASE_SETTINGS); the tokenizer's --val_limit is left out: it sizes only the
    reconstruction check logged after training, not the weights."""
    settings = {k: preset.get(k) for k in BASE_SETTINGS}
    settings["tok"] = [f for f in settings["tok"] or [] if not f.startswith("--val_limit=")]
    return settings


def adopt_base(base: Path, out: Path, plan: dict) -> None:
    """Copy another study folder's tokenizer pointer, classifier and reference sets (with their scores) into `out`,
    so that `out` trains other model rows or budgets on the same tokenizer and scores them alike."""
    base_plan_path = base / "plan.json"
    if not (base / "scores" / "ceiling.json").is_file() or not base_plan_path.is_file():
        raise FileNotFoundError(f"--base={base}: not a study folder whose reference sets are finished (no "
                                f"plan.json or scores/ceiling.json)")
    base_plan = json.loads(base_plan_path.read_text())
    ours, theirs = base_settings(plan["preset"]), base_settings(base_plan["preset"])
    differ = [k for k in BASE_SETTINGS if ours[k] != theirs[k]]
    if differ:
        raise ValueError(f"--base={base}: its study has other data/tokenizer/scoring settings ({', '.join(differ)})")
    for name in ("classifier.pt", "classifier.json", *(f"sets/{n}.npz" for n in ("test", "test_inception", "floor",
                                                                                  "ceiling")),
                 "scores/floor.json", "scores/ceiling.json"):
        if (base / name).is_file():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(base / name, out / name)
    (out / "tokenizer").mkdir(parents=True, exist_ok=True)
    save_json({"ckpt": str(Path(base_plan["tokenizer"]).resolve())}, out / "tokenizer" / "done.json")


def prepare(args: argparse.Namespace, out: Path, plan: dict) -> tuple[dict, bool]:
    """Tokenizer, token cache and classifier (in this process), then the plan with its paths, saved to plan.json;
    reuses what a previous run finished. Returns (plan, whether anything was computed)."""
    preset, worked = plan["preset"], False
    fmnist = [f"--fmnist_dir={args.fmnist_dir}"] if args.fmnist_dir else []
    tok_done = out / "tokenizer" / "done.json"
    if not tok_done.is_file():
        tok_args = tokenizer_trainer.build_parser().parse_args(preset["tok"] + fmnist + [
            "--dataset=fmnist", f"--reso={preset['reso']}", "--mid_reso=1.0", f"--pn={preset['pn']}",
            *(f"--{k}={v}" for k, v in TOKENIZER.items()), f"--out_dir={out / 'tokenizer'}", "--seed=0",
            "--log_every=50"])
        save_json({"ckpt": str(tokenizer_trainer.train(tok_args))}, tok_done)
        setup_logging(0, out)
        worked = True
    tok_ckpt = json.loads(tok_done.read_text())["ckpt"]
    clf_path = out / "classifier.pt"
    if not clf_path.is_file():
        _, train_set, val_set = build_datasets("", "fmnist", preset["reso"], 1.0, fmnist_dir=args.fmnist_dir or None,
                                               train_limit=preset.get("clf_limit", 0))  # 0: all 60,000
        classifier = train_classifier(train_set, 10, epochs=preset["clf_epochs"], seed=0)
        save_json({"test_accuracy": accuracy(classifier, val_set)}, out / "classifier.json")
        write_atomic(clf_path, lambda f: torch.save(classifier.state_dict(), f))
        worked = True
    tokens = extract_study_tokens(out, preset, tok_ckpt, fmnist)
    data = [f"--pn={preset['pn']}", f"--train_limit={preset['train_limit']}", f"--val_limit={preset['val_limit']}",
            f"--val_every={preset['val_every']}", f"--bs={preset['bs']}", f"--tlr={preset['tlr']}",
            f"--vae_ckpt={tok_ckpt}", f"--tokens={tokens}", *fmnist]
    plan = dict(plan, train_flags=TRAIN_FLAGS + data + eval_flags(plan, clf_path), tokenizer=tok_ckpt,
                fmnist_dir=args.fmnist_dir, inception=args.inception, jobs=args.jobs, base=args.base)
    save_json(plan, out / "plan.json")
    return plan, worked


def eval_flags(plan: dict, clf_path: Path) -> list[str]:
    """train.py's flags for the evaluations inside a run (none without --eval_every): the final scoring's sampling
    settings on fewer images (the preset's eval_n)."""
    s = plan["sampling"]
    return [f"--eval_n={plan['preset']['eval_n']}", f"--eval_net={clf_path.resolve()}", f"--eval_cfg={s['cfg']}",
            f"--eval_top_k={s['top_k']}", f"--eval_top_p={s['top_p']}"] if plan["preset"]["eval_every"] else []


def extract_study_tokens(out: Path, preset: dict, tok_ckpt: str, fmnist: list[str]) -> Path:
    """The token ids of the images the runs train and validate on (scripts/extract_tokens.py; the centre view is
    the training transform at --mid_reso=1): the runs train from them (train.py --tokens, loss for loss equal to
    training from the images: tests/test_token_cache.py) instead of running the tokenizer's encoder every step.
    A complete cache of these settings is kept, an interrupted one continued, one of other settings refused."""
    tokens = (out / "tokens").resolve()
    extract_tokens.main(extract_tokens.build_parser().parse_args([
        "--dataset=fmnist", *fmnist, f"--vae_ckpt={tok_ckpt}", f"--pn={preset['pn']}", "--mid_reso=1.0",
        f"--out={tokens}", f"--limit={max(preset['train_limit'], preset['val_limit'])}"]))
    return tokens


def main(args: argparse.Namespace) -> Path:
    """Run the study; returns the report's path."""
    out = Path(args.out_dir or ("local_output/study-quick" if args.quick else "local_output/study"))
    plan = make_plan(args)  # bad flags, missing data or weights, another study in the folder: refused here
    if plan["preset"]["inception_n"]:
        find_inception(args.inception)
    fashion_mnist_dir(args.fmnist_dir or None)
    check_folder(out, plan)
    if args.report_dir:  # written after the whole study: an unwritable one would fail hours from now
        check_writable(Path(args.report_dir), f"--report_dir={args.report_dir}")
    if args.base and not (out / "plan.json").is_file():
        adopt_base(Path(args.base), out, plan)
    for sub in ("sets", "scores", "runs", "logs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    setup_logging(0, out)
    t0 = time.time()
    plan, worked = prepare(args, out, plan)
    if not (out / "scores" / "ceiling.json").is_file():
        reference_sets(out, plan)
        worked = True
    todo = [r for r in job_order(plan) if not (out / "scores" / f"{r}.json").is_file()]
    run_parallel(out, todo, args.jobs)
    for run in plan["runs"]:
        recount_flops(out, plan, run)
    timing_path = out / "wall_time.json"  # summed over the runs that computed something
    total = json.loads(timing_path.read_text())["seconds"] if timing_path.is_file() else 0.0
    if worked or todo:
        total += time.time() - t0
        save_json({"seconds": total}, timing_path)
    report = write_report(out, Path(args.report_dir) if args.report_dir else out / "report", plan, total,
                          " ".join(["python scripts/study.py", *sys.argv[1:]]))
    logger.info("study done in %.0f min of computing; report %s", total / 60, report)
    return report


def cli(argv: list[str] | None = None) -> Path:
    """The command line: `main` with the script's own errors as one `error: ...` line (exit status 1)."""
    args = build_parser().parse_args(argv)
    try:
        return main(args)
    except (ValueError, FileNotFoundError, CheckpointError, RunLockError, NonFiniteError, StudyJobError) as e:
        # a bad flag, missing data or weights, another study in the folder (ValueError: the token cache's and output
        # folder's errors too), an unwritable folder, a diverged tokenizer, a failed job (its log named)
        raise SystemExit(f"error: {e}") from e


if __name__ == "__main__":
    # `python -m scripts.study` as `python scripts/study.py`: the fork server's children re-run this file by its
    # path as __mp_main__; by its name, runpy warns in each that the preloaded scripts.study is imported already
    __spec__ = None
    cli()
