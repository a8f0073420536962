"""Is training still healthy? One judgement per optimizer step, from the loss all ranks agree on.

A step is *bad* when its loss or gradient is non-finite, or when its loss is more than `tol` times its running
level (at least `tol` nats: a memorised batch's level near 0 would otherwise flag ordinary noise). The running
level is an exponential average of the good steps' losses only, so a diverged stretch does not raise it. The
trainer skips the update of a bad step and stops after --max_nonfinite bad steps in a row (trainer.py); train.py
postpones a save while the last step was bad and, when the run stops, sets aside the checkpoint the bad steps
started from. Ordinary training (VAR's recipe: a cross-entropy that falls from about log V) never comes near the
default tolerance (--diverge_tol).
"""
import logging
import math
from typing import Any

from utils.run.log import SAME_ON_ALL_RANKS

logger = logging.getLogger(__name__)
LEVEL_FLOOR = 1.0  # nats: the tolerance applies to at least this level


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row were bad: a non-finite loss or gradient, or a diverged loss."""


class DivergenceGuard:
    """Counts bad optimizer steps in a row; `tol` 0 turns the level test off (non-finite steps still count)."""

    def __init__(self, tol: float = 10.0, beta: float = 0.9):
        self.tol, self.beta = tol, beta
        self.level: float | None = None  # running level of the good losses; None before the first
        self.bad_in_a_row = 0

    @property
    def healthy(self) -> bool:
        """Whether the last judged step was good."""
        return self.bad_in_a_row == 0

    def judge(self, loss: float, grad_finite: bool = True) -> str | None:
        """Why a step with this loss is bad (None: it is good); changes nothing."""
        if not (grad_finite and math.isfinite(loss)):
            return f"non-finite loss/gradient (loss {loss:.4g})"
        if self.tol > 0 and self.level is not None and loss > self.tol * max(self.level, LEVEL_FLOOR):
            return f"loss {loss:.4g} is above {self.tol:g}x its running level {self.level:.4g}"
        return None

    def update(self, loss: float, grad_finite: bool = True) -> str | None:
        """Judge a step and count it: a good loss moves the running level, a bad one the count -> `judge`'s reason."""
        reason = self.judge(loss, grad_finite)
        if reason is not None:
            self.bad_in_a_row += 1
            return reason
        self.bad_in_a_row = 0
        self.level = loss if self.level is None else self.beta * self.level + (1 - self.beta) * loss
        return None

    def skipped(self, reason: str, what: str, max_bad: int, hint: str) -> None:
        """After `update` judged a step bad and the caller left its update out: warn (from rank 0: every rank judged
        alike), and raise NonFiniteError at `max_bad` bad steps in a row. `what` names the step ("optimizer step",
        with the grad norm), `hint` says which flags to change."""
        logger.warning("%s: %s skipped (%d in a row)", reason, what, self.bad_in_a_row, extra=SAME_ON_ALL_RANKS)
        if self.bad_in_a_row >= max_bad:
            tol = f", --diverge_tol={self.tol:g}" if self.tol > 0 else ""
            raise NonFiniteError(f"{self.bad_in_a_row} steps in a row were bad (the last: {reason}; "
                                 f"--max_nonfinite={max_bad}{tol}): stopping; {hint}")

    def state_dict(self) -> dict[str, Any]:
        """The running level and the count, for a checkpoint."""
        return {"level": self.level, "bad_in_a_row": self.bad_in_a_row}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict`; an empty dict (a checkpoint written before the guard) starts afresh."""
        self.level, self.bad_in_a_row = state.get("level"), state.get("bad_in_a_row", 0)
