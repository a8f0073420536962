"""fp16 loss scaling (--fp16=1) as VAR trains: torch's GradScaler from a scale of 2**11, doubled after 1000 steps
without an overflow, and brought back to 2**15 at the update after it passed it (so a step after a growth from 2**15
runs at 2**16, as in VAR), and the rule both trainers (trainer.py, tokenizer_trainer.py) apply to its
skipped steps: an overflow (a finite loss whose scaled gradients are non-finite) is the scaler's ordinary skip,
not a bad step (`utils.run.divergence`), until --max_nonfinite of them come in a row."""
import logging
import math

import torch

from utils.run.divergence import NonFiniteError

logger = logging.getLogger(__name__)


class LossScaler(torch.amp.GradScaler):
    """GradScaler with VAR's settings and cap, counting its overflows in a row."""

    CAP = 32768.0  # VAR's: a higher scale overflows the fp16 gradients more often; checked before each update

    def __init__(self, device_type: str, max_nonfinite: int, hint: str):
        super().__init__(device_type, init_scale=2.0**11, growth_interval=1000)
        self.max_nonfinite, self.hint = max_nonfinite, hint
        self.overflows_in_a_row = 0

    def is_overflow(self, loss: float, grad_norm: float) -> bool:
        """Whether a step with this (rank-averaged) `loss` and unscaled gradient norm overflowed fp16; counted in a
        row (a step without resets the count)."""
        overflow = math.isfinite(loss) and not math.isfinite(grad_norm)
        self.overflows_in_a_row = self.overflows_in_a_row + 1 if overflow else 0
        return overflow

    def update_capped(self) -> None:
        """`update` after a step whose `unscale_` recorded whether the gradients were finite, or the scale set back
        to CAP when it had grown past it."""
        self.update(new_scale=self.CAP if self.get_scale() > self.CAP else None)

    def state_dict(self) -> dict:
        """GradScaler's state and the overflows in a row (a resume inside a run of them counts on, as the guard's
        bad steps do)."""
        return {**super().state_dict(), "overflows_in_a_row": self.overflows_in_a_row}

    def load_state_dict(self, state_dict: dict) -> None:
        """`state_dict`'s; one saved before the count was kept starts it at 0."""
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "overflows_in_a_row"})
        self.overflows_in_a_row = state_dict.get("overflows_in_a_row", 0)

    def skipped(self, what: str) -> None:
        """Log an overflowed `what` (GradScaler skipped it); NonFiniteError once --max_nonfinite came in a row."""
        logger.info("fp16 overflow: GradScaler skipped %s, loss scale now %g", what, self.get_scale())
        if self.overflows_in_a_row >= self.max_nonfinite:
            raise NonFiniteError(f"{self.overflows_in_a_row} fp16 steps in a row overflowed although GradScaler "
                                 f"lowered the loss scale each time (--max_nonfinite={self.max_nonfinite}): "
                                 f"stopping; {self.hint}")
