"""VAR's learning-rate, weight-decay and progressive-training schedules, as pure functions of the iteration.

Iterations count loader steps (micro-batches with `--ac` > 1), as in VAR. `max_it` = epochs * iterations per epoch.
"""
import math
from dataclasses import dataclass

import torch

SCHEDULES = ("lin0", "lin", "lin00", "cos", "exp", "const", "lin<T> (e.g. lin0.5)")


def lr_factor(sche: str, it: int, wp_it: float, max_it: int, wp0: float = 0.005, wpe: float = 0.01) -> float:
    """Multiplier of the peak lr at iteration `it`.

    Warm-up: linear from `wp0` to 1 over round(wp_it) iterations. Then, with p in [0, 1] the fraction of the
    post-warm-up iterations done:
      lin0   hold 1 for p < 0.05, then linear to `wpe` (VAR's default)
      lin    the same with a 15% hold
      lin00  linear from 1 to `wpe`, no hold
      cos    half cosine from 1 to `wpe`
      exp    hold 15%, then exponential decay to `wpe`
      const  hold 1 (taming-transformers' VQGAN recipe, for the tokenizer; not VAR's)
      lin<T> (T a float, set by progressive training `--pg`): linear from 1 to a midpoint over p < T, then
             linear to `wpe`.
    """
    wp_it = round(wp_it)
    if it < wp_it:
        return wp0 + (1 - wp0) * it / wp_it
    p = (it - wp_it) / max(max_it - 1 - wp_it, 1)
    rest = 1 - p
    if sche == "cos":
        return wpe + (1 - wpe) * (0.5 + 0.5 * math.cos(math.pi * p))
    if sche in ("lin", "lin0", "exp"):
        hold = 0.05 if sche == "lin0" else 0.15
        if p < hold:
            return 1.0
        if sche == "exp":
            return math.exp((p - hold) / (1 - hold) * math.log(wpe))
        return wpe + (1 - wpe) * rest / (1 - hold)
    if sche == "const":
        return 1.0
    if sche == "lin00":
        return wpe + (1 - wpe) * rest
    if sche.startswith("lin"):
        try:
            T = float(sche[3:])
        except ValueError:
            raise ValueError(f"--sche={sche!r}: expected one of {SCHEDULES}") from None
        if not 0 < T < 1:  # T >= 1 never decays to wpe (or divides by zero), T <= 0 starts off the peak
            raise ValueError(f"--sche={sche!r}: lin<T> needs 0 < T < 1 (the fraction of the run at its midpoint)")
        mid = (1 + wpe + (1 - wpe) * (1 - T)) / 2
        if p < T:
            return 1 + (mid - 1) * p / T
        return wpe + (mid - wpe) * rest / (1 - T)
    raise ValueError(f"--sche={sche!r}: expected one of {SCHEDULES}")


def schedule_problem(sche: str, wp0: float = 0.005, wpe: float = 0.01) -> str:
    """Why `lr_factor` cannot run `sche` from its first to its last iteration ("" when it can): an unknown name,
    lin<T> with T outside (0, 1), exp towards wpe = 0 (the log of zero)."""
    try:
        [lr_factor(sche, it, 0, 3, wp0=wp0, wpe=wpe) for it in range(3)]
    except ValueError as e:
        return str(e) if "--sche" in str(e) else f"--sche={sche} decays to --wpe={wpe:g} times the peak lr " \
            f"exponentially ({e}): expected --wpe > 0"
    return ""


def wd_at(it: int, max_it: int, twd: float, twde: float) -> float:
    """Weight decay: half cosine from `twd` at it=0 to `twde` at the last iteration."""
    p = it / max(max_it - 1, 1)
    return twde + (twd - twde) * (0.5 + 0.5 * math.cos(math.pi * p))


def set_lr_wd(optimizer: torch.optim.Optimizer, lr: float, wd: float) -> None:
    """Write lr and wd into every param group, scaled by the group's `lr_sc` / `wd_sc` (no-decay groups: 0)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_sc", 1.0)
        group["weight_decay"] = wd * group.get("wd_sc", 1.0)


def prog_si_at(it: int, wp_it: float, max_it: int, pg: float, pg0: int, num_scales: int) -> int:
    """Progressive training stage: the last trained scale at iteration `it` (-1 = all scales, no `--pg`).

    Scale `pg0` through warm-up, then rising linearly to the last scale at `pg` * max_it.
    """
    if pg <= 0:
        return -1
    if it <= wp_it:
        return pg0
    if it >= max_it * pg:
        return num_scales - 1
    progress = min(max((it - wp_it) / (max_it * pg - wp_it), 0.0), 1.0)
    return pg0 + round(progress * (num_scales - 1 - pg0))


def prog_state(it: int, wp_it: float, max_it: int, pg: float, pg0: int, num_scales: int,
               pgwp_it: float) -> tuple[int, float]:
    """(prog_si, prog_wp) at iteration `it`: the stage (-1 = all scales) and the loss weight of its newest scale.

    prog_wp ramps from 1/pgwp_it to 1 over `pgwp_it` iterations after each stage change (floor 0.01), and is 1 in
    the first stage (covered by the lr warm-up). The stage start is found by bisection, so no counter needs saving.
    """
    si = prog_si_at(it, wp_it, max_it, pg, pg0, num_scales)
    if si < 0 or si == num_scales - 1:  # the last stage trains all scales with full weight
        return -1, 1.0
    lo, hi = 0, it  # first iteration of stage `si`: prog_si_at is non-decreasing in it
    while lo < hi:
        mid = (lo + hi) // 2
        if prog_si_at(mid, wp_it, max_it, pg, pg0, num_scales) >= si:
            hi = mid
        else:
            lo = mid + 1
    first_stage = prog_si_at(0, wp_it, max_it, pg, pg0, num_scales) == si
    prog_wp = 1.0 if first_stage else max(min((it - lo + 1) / max(pgwp_it, 1e-8), 1.0), 0.01)
    return si, prog_wp


@dataclass(frozen=True)
class SchedulePoint:
    """The schedule at one iteration: lr, weight decay and the progressive stage (-1 = all scales) with the loss
    weight of its newest scale."""
    lr: float
    wd: float
    prog_si: int = -1
    prog_wp: float = 1.0


@dataclass(frozen=True)
class Schedule:
    """VAR's schedules as one object: peak lr `tlr` shaped by `lr_factor`, weight decay `wd_at`, progressive
    training `prog_state` (off with pg = 0). Iterations are global loader steps."""
    tlr: float
    max_it: int
    wp_it: float
    sche: str = "lin0"
    wp0: float = 0.005
    wpe: float = 0.01
    twd: float = 0.05
    twde: float = 0.05
    pg: float = 0.0
    pg0: int = 4
    num_scales: int = 10
    pgwp_it: float = 0.0

    def at(self, it: int) -> SchedulePoint:
        prog_si, prog_wp = prog_state(it, self.wp_it, self.max_it, self.pg, self.pg0, self.num_scales, self.pgwp_it)
        return SchedulePoint(lr=self.tlr * lr_factor(self.sche, it, self.wp_it, self.max_it, self.wp0, self.wpe),
                             wd=wd_at(it, self.max_it, self.twd, self.twde), prog_si=prog_si, prog_wp=prog_wp)
