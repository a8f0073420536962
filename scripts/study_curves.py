"""The study's learning curves (scripts/study.py with evaluations inside each run, train.py --eval_every): FD_clf
and class consistency against training images, training FLOPs and this CPU's training time, with the seeds'
spread, and verdicts read off them at equal images, equal FLOPs and equal time.

Inputs under the study's work folder: runs/<run>/curve.json (the run's `eval_history`: one point per evaluation,
{"epoch", "images", "train_s", "fd_clf", "consistency"}) and runs/<run>/timing.json (training FLOPs per image).
A point inside a run comes from that run's schedule: the learning rate there has not decayed as it would in a run
that ends at that point, so a curve's early points understate what a run of that length would reach.
"""
import argparse
import json
import math
import statistics
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (the backend must be chosen first)
import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

AXES = {"images": "training images", "flops": "training FLOPs (model, models/flops.py's count)",
        "minutes": "training time on this CPU (min, one thread)"}
METRICS = {"fd_clf": "FD_clf (lower is better)", "consistency": "class consistency (higher is better)"}
PAIRS = (("mvar", "var", "M-VAR vs VAR"), ("mvar-w", "var", "M-VAR-W (VAR's params) vs VAR"),
         ("mvar-d", "var", "M-VAR-D (VAR's params) vs VAR"))
BUDGET_FRACTIONS = (0.25, 0.5, 1.0)  # comparison points on every axis: these fractions of the first row's budget


def run_curve(points: list[dict], train_flops_per_image: float) -> dict[str, np.ndarray]:
    """One run's evaluations -> arrays "images", "flops", "minutes", "fd_clf", "consistency"."""
    images = np.array([p["images"] for p in points], dtype=float)
    return dict(images=images, flops=images * train_flops_per_image,
                minutes=np.array([p["train_s"] for p in points]) / 60,
                fd_clf=np.array([p["fd_clf"] for p in points]),
                consistency=np.array([p["consistency"] for p in points]))


def collect_curves(out: Path, plan: dict) -> dict[str, list[dict[str, np.ndarray]]]:
    """Per row, one `run_curve` per finished run of the study's work folder."""
    curves: dict[str, list[dict[str, np.ndarray]]] = {}
    for run, spec in plan["runs"].items():
        path, timing = out / "runs" / run / "curve.json", out / "runs" / run / "timing.json"
        if path.is_file() and timing.is_file():
            curves.setdefault(spec["row"], []).append(run_curve(
                json.loads(path.read_text()), json.loads(timing.read_text())["train_flops_per_image"]))
    return curves


def curves_from_data(data: dict) -> dict[str, list[dict[str, np.ndarray]]]:
    """`collect_curves` from a published study_data.json (scripts.study_report.write_data) instead of the folder."""
    curves: dict[str, list[dict[str, np.ndarray]]] = {}
    for run, spec in data["plan"]["runs"].items():
        got = data["runs"].get(run, {})
        if got.get("evaluations") and got.get("timing"):
            curves.setdefault(spec["row"], []).append(run_curve(got["evaluations"],
                                                                got["timing"]["train_flops_per_image"]))
    return curves


def at(runs: list[dict[str, np.ndarray]], axis: str, x: float, metric: str) -> list[float]:
    """Each run's `metric` at `x` on `axis`, interpolated linearly between its evaluations."""
    return [float(np.interp(x, r[axis], r[metric])) for r in runs]


def common_range(runs: list[dict[str, np.ndarray]], axis: str) -> tuple[float, float]:
    """The span of `axis` that every run's curve covers."""
    return max(r[axis][0] for r in runs), min(r[axis][-1] for r in runs)


def spread(values: list[float]) -> float:
    """Half the min-max range over seeds (0 for one seed)."""
    return (max(values) - min(values)) / 2


SIGNIFICANCE = 0.05  # two-sided Welch test over seeds


def welch(a: list[float], b: list[float]) -> tuple[float, float] | None:
    """(t, p) of the two-sided Welch test of two rows' scores over seeds; None where it cannot run (a non-finite
    score, equal means, one seed on a side, seeds that agree exactly on both sides)."""
    if not all(math.isfinite(v) for v in (*a, *b)) or statistics.mean(a) == statistics.mean(b) or \
            min(len(a), len(b)) < 2 or np.var(a) == np.var(b) == 0:
        return None
    with warnings.catch_warnings():  # scipy warns of precision loss when one side's seeds nearly agree
        warnings.simplefilter("ignore", RuntimeWarning)
        t, p = stats.ttest_ind(a, b, equal_var=False)
    return float(t), float(p)


def welch_p(a: list[float], b: list[float]) -> float | None:
    """`welch`'s p, None where the test cannot run."""
    test = welch(a, b)
    return None if test is None else test[1]


def holm(p_values: list[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of the p values of one family of tests (the Nones, tests that did not run, stay
    None and do not count): the family's chance of any false "better" stays below the level."""
    ran = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for k, (p, i) in enumerate(ran):
        running = max(running, min(1.0, (len(ran) - k) * p))
        adjusted[i] = running
    return adjusted


def families(p_values: list[float | None]) -> list[tuple[float, int] | None]:
    """Per test of one family, what `who_leads` takes as `family`: (its Holm-adjusted p, the number of tests that
    ran); None for a test that did not run, and for every test where only one ran (nothing to adjust)."""
    ran = sum(p is not None for p in p_values)
    return [None if adjusted is None or ran < 2 else (adjusted, ran) for adjusted in holm(p_values)]


def fmt_p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def who_leads(a: list[float], b: list[float], la: str, lb: str, family: tuple[float, int] | None = None
              ) -> tuple[bool | None, str]:
    """Which of two rows' FD_clf over seeds (lower is better) is lower, and whether by more than the seeds'
    noise: (True: `a` significantly better, False: `b` significantly better, None: neither) and the words, with
    the difference and the two-sided Welch test over the seeds. With 2 seeds a side the test has 1-2 degrees of
    freedom: only a difference many times the spread is significant. `family`: (Holm-adjusted p, number of tests)
    where this test is one of several on the same runs; the adjusted p then decides."""
    if not all(math.isfinite(v) for v in (*a, *b)):
        return None, f"untested (a score is not finite: {la} {a}, {lb} {b})"
    diff = statistics.mean(a) - statistics.mean(b)
    if diff == 0:
        return None, f"level (both {statistics.mean(a):.2f})"
    lead = la if diff < 0 else lb
    if min(len(a), len(b)) < 2:
        return None, f"{lead} ahead, untested (difference {diff:+.2f}; one seed on a side)"
    if np.var(a) == np.var(b) == 0:
        return None, f"{lead} ahead, untested (difference {diff:+.2f}; the seeds agree exactly on both sides)"
    t, p = welch(a, b)
    test = f"difference {diff:+.2f}, Welch t = {t:.1f}, {fmt_p(p)}, {len(a)} vs {len(b)} seeds"
    if family is not None:
        p = family[0]
        test += f"; Holm over {family[1]} tests: {fmt_p(p)}"
    if p < SIGNIFICANCE:
        return diff < 0, f"**{lead} better** ({test})"
    return None, f"{lead} ahead, not significant ({test})"


def comparison_points(a: list[dict], b: list[dict], axis: str) -> list[float]:
    """Where to compare rows a and b on `axis`: the same BUDGET_FRACTIONS of a's final point on every axis (early
    points on one axis only would read an early lead off the axis that shows one), and the end of the common range
    where a's final point lies past it; only points that every run of both rows covers."""
    lo, hi = common_range(a + b, axis)
    if lo > hi:  # e.g. a row evaluated once, at its end, past b's last point: nothing to compare with
        return []
    final = statistics.mean(r[axis][-1] for r in a)
    return sorted({f * final for f in BUDGET_FRACTIONS if lo <= f * final <= hi} | ({hi} if final > hi else set()))


def axis_name(axis: str) -> str:
    """The axis in words, without the plot label's parenthesis."""
    return AXES[axis].split(" (")[0]


def fmt_x(axis: str, x: float) -> str:
    return {"images": f"{x:,.0f} images", "flops": f"{x / 1e9:,.0f} GFLOP",
            "minutes": f"{x:.1f} min of training"}[axis]


def verdict(rows: dict[str, dict], a: str, b: str, curves: dict, axis: str, x: float,
            family: tuple[float, int] | None = None) -> str:
    """One sentence: both rows' FD_clf and consistency at `x` on `axis`, and who leads (who_leads; `family`: its
    Holm-adjusted p among the pair's tests)."""
    fa, fb = at(curves[a], axis, x, "fd_clf"), at(curves[b], axis, x, "fd_clf")
    ca, cb = at(curves[a], axis, x, "consistency"), at(curves[b], axis, x, "consistency")
    la, lb = rows[a]["label"], rows[b]["label"]
    _, who = who_leads(fa, fb, la, lb, family)
    return (f"at equal {axis_name(axis)} ({fmt_x(axis, x)}): {la} FD_clf {mean_spread(fa)} vs {lb} "
            f"{mean_spread(fb)}: {who}; class consistency {statistics.mean(ca):.2f} vs {statistics.mean(cb):.2f}")


def mean_spread(values: list[float]) -> str:
    """'mean ± half the min-max range', or the single value of one seed."""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {spread(values):.2f}"


def verdicts(rows: dict[str, dict], curves: dict) -> str:
    """The comparisons the paper makes, read off the curves at equal images, FLOPs and time. The tests of one pair
    (all its points, on the same runs) are one family: "better" needs its Holm-adjusted p below the level."""
    lines = []
    for a, b, title in PAIRS:
        if a not in curves or b not in curves:
            continue
        points = [(axis, x) for axis in AXES for x in comparison_points(curves[a], curves[b], axis)]
        raw = [welch_p(at(curves[a], axis, x, "fd_clf"), at(curves[b], axis, x, "fd_clf")) for axis, x in points]
        family = dict(zip(points, families(raw), strict=True))
        lines.append(f"- **{title}**")
        for axis in AXES:
            lines += [f"  - {verdict(rows, a, b, curves, axis, x, family[axis, x])}." for ax, x in points
                      if ax == axis] or [f"  - at equal {axis_name(axis)}: the curves do not overlap."]
    return "\n".join(lines) or "No pair of the paper's rows has curves."


def learned(rows: dict[str, dict], ceiling_fd: float) -> str:
    """Whether the largest budget's models have learned: consistency >= 0.80 and FD_clf within 2.5x the ceiling's
    (the final scoring of each row's runs: all samples, the full test set)."""
    lines = []
    for key in ("var", "mvar"):
        scores = rows.get(key, {}).get("scores")
        if not scores:
            continue
        cons, fd = statistics.mean(s["consistency"] for s in scores), statistics.mean(s["fd_clf"] for s in scores)
        ok = cons >= 0.8 and fd <= 2.5 * ceiling_fd
        lines.append(f"- {rows[key]['label']}: class consistency {cons:.3f} (needed >= 0.80), FD_clf {fd:.2f} = "
                     f"{fd / ceiling_fd:.1f}x the ceiling's {ceiling_fd:.2f} (needed <= 2.5x): "
                     f"{'learned' if ok else '**not yet learned**'}.")
    return "\n".join(lines)


def plot_curves(rows: dict[str, dict], curves: dict, path: Path) -> None:
    """FD_clf and consistency (rows of panels) against images, FLOPs and minutes (columns): each seed faint, the
    seeds' mean (on the first seed's points) bold, the min-max band shaded."""
    fig, axes = plt.subplots(len(METRICS), len(AXES), figsize=(14, 7.5), squeeze=False)
    for i, metric in enumerate(METRICS):
        for j, axis in enumerate(AXES):
            ax = axes[i][j]
            for key, runs in curves.items():
                color, label = rows[key]["color"], rows[key]["label"]
                for r in runs:
                    ax.plot(r[axis], r[metric], color=color, alpha=0.35, lw=1)
                lo, hi = common_range(runs, axis)
                xs = [x for x in runs[0][axis] if lo <= x <= hi]
                vals = np.array([at(runs, axis, x, metric) for x in xs])
                if len(xs):
                    ax.plot(xs, vals.mean(1), "o-", color=color, ms=3, label=label if i == j == 0 else None)
                    ax.fill_between(xs, vals.min(1), vals.max(1), color=color, alpha=0.15)
            ax.set_xlabel(AXES[axis])
            ax.set_ylabel(METRICS[metric])
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("data", type=Path, help="a study's study_data.json (e.g. docs/study_data.json)")
    return p


def main(argv: list[str] | None = None) -> None:
    """Print the verdicts a published study_data.json gives with this code (a re-reading needs no work folder)."""
    data = json.loads(build_parser().parse_args(argv).data.read_text())
    print(verdicts(data["plan"]["rows"], curves_from_data(data)))


if __name__ == "__main__":
    main()
