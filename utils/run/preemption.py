"""Graceful stop on SIGTERM / SIGINT (preemption by SLURM or Kubernetes, Ctrl-C).

Training (`Preemption`): the first signal only sets a flag. The training loop polls it once per step with
`requested()`, a collective that all ranks agree on (one 1-element all-reduce, on the CPU over gloo so that it
never waits for the GPU), so every rank finishes the same step, the checkpoint is written collectively, and
`exit()` ends the process with a clear line and status 128 + signal. A second signal exits at once, without a
checkpoint. Signals closer than `REPEAT_S` to the first count as the same event delivered twice: SLURM signals
every process of a job, and torchrun forwards the signal it gets (Ctrl-C included) to its workers, so each worker
usually gets two at once. Work without a checkpoint (sample.py's pictures) uses `sigterm_raises` to keep what is
finished. Work that may outlast a grace period (validation, an evaluation) asks a `stop` callback, the same
collective, before each unit and raises `Stopped`.
"""
import contextlib
import logging
import os
import signal
import time
from collections.abc import Iterator
from typing import NoReturn

import torch
import torch.distributed as tdist

import dist
from utils.run.log import SAME_ON_ALL_RANKS

logger = logging.getLogger(__name__)

REPEAT_S = 2.0


class Stopped(Exception):
    """A collective `stop()` check said yes before a unit of work (a val batch, an evaluation chunk), on every rank
    alike: that work ended without a result."""


class Preemption:
    """Installs the handlers on creation (collective under torchrun: it may create a gloo group); `close()`
    puts the previous ones back."""

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)):
        self.signum = 0  # the first signal received here, 0 if none
        self.agreed = 0  # the signal every rank agreed to stop on, 0 while training goes on
        self._t_first = 0.0
        self._group = None
        if dist.initialized() and tdist.get_backend() != "gloo":
            self._group = tdist.new_group(backend="gloo", timeout=dist.timeout())  # --dist_timeout_min
        self._previous = {s: signal.signal(s, self._on_signal) for s in signals}

    def _on_signal(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if not self.signum:
            self.signum, self._t_first = signum, time.monotonic()
            logger.warning("%s received: finishing this step, then saving a checkpoint and exiting (send it again "
                           "to exit at once, without a checkpoint)", name)
        elif time.monotonic() - self._t_first >= REPEAT_S:
            logger.warning("second %s: exiting now, without a checkpoint", name)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def requested(self) -> bool:
        """Collective, once per step on every rank: True everywhere once any rank got a signal."""
        if not self.agreed:
            flag = torch.tensor([self.signum], dtype=torch.int64)
            if dist.initialized():
                tdist.all_reduce(flag, op=tdist.ReduceOp.MAX, group=self._group)
            self.agreed = int(flag.item())
        return bool(self.agreed)

    def close(self) -> None:
        """Restore the handlers found at creation (training finished normally)."""
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def exit(self, where: str) -> NoReturn:
        """After the checkpoint is saved: log the stop and end the process with status 128 + signal."""
        logger.warning("stopped by %s %s; run the same command to resume", signal.Signals(self.agreed).name, where,
                       extra=SAME_ON_ALL_RANKS)
        raise SystemExit(128 + self.agreed)


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Inside the block SIGTERM raises SystemExit(143), as Ctrl-C raises KeyboardInterrupt, so that the caller's
    `except`/`finally` keeps what is finished (SIGTERM's default ends the process without running them)."""
    def stop(signum: int, frame) -> None:
        logger.warning("%s received: stopping", signal.Signals(signum).name)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
