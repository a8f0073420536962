"""Kernel backends, chosen at run time: one resolver for intra-scale attention and Mamba2, one error type.

Which kernel runs is not part of a model (`MVARConfig` and checkpoints do not hold it), so weights move freely
between machines. Every CLI spells the choice `--attn_backend` / `--mamba_backend` (train.py's `--fuse=0` is
VAR's alias for the portable pair); "auto" defers to $MVAR_ATTN_BACKEND / $MVAR_MAMBA_BACKEND, else picks the
first kernel in the op's order of preference that can run on the inputs. A forced kernel that cannot run is a
`BackendError` saying why. Each distinct outcome is logged once.
"""
import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from models.presets import ATTN_KERNELS, MAMBA_KERNELS

logger = logging.getLogger(__name__)


class BackendError(ValueError):
    """An unknown backend name, or a forced backend that cannot run here (the message says why)."""


@dataclass(frozen=True)
class Op:
    """One op with interchangeable kernels: its log label, env var, kernels in order of preference, and the
    portable one (pure PyTorch, runs everywhere)."""

    label: str
    flag: str
    env: str
    kernels: tuple[str, ...]

    @property
    def choices(self) -> tuple[str, ...]:
        return ("auto", *self.kernels)

    @property
    def portable(self) -> str:
        return self.kernels[-1]


ATTN = Op("intra-scale attention", "attn_backend", "MVAR_ATTN_BACKEND", ATTN_KERNELS)
MAMBA = Op("Mamba2", "mamba_backend", "MVAR_MAMBA_BACKEND", MAMBA_KERNELS)


def check_name(op: Op, backend: str, source: str | None = None) -> str:
    """`backend` if it is one of `op.choices`, else a BackendError naming where it came from."""
    if backend not in op.choices:
        raise BackendError(f"{source or op.flag}={backend!r}: expected one of {op.choices}")
    return backend


def requested(op: Op, backend: str) -> tuple[str, str]:
    """(the backend asked for, where it came from): `backend`, or for "auto" the op's env var when it is set."""
    check_name(op, backend)
    if backend == "auto" and os.environ.get(op.env):
        return check_name(op, os.environ[op.env], op.env), op.env
    return backend, op.flag


def resolve(op: Op, backend: str, unavailable: Callable[[str], str | None], context: str) -> str:
    """The kernel that will run for `backend` ("auto" or a name). `unavailable(name)` says why a kernel cannot
    run on these inputs (None: it can); `context` describes the inputs for the log line."""
    choice, source = requested(op, backend)
    skipped = ""
    if choice == "auto":  # the first kernel that can run; the portable one always can
        for name in op.kernels:
            reason = unavailable(name)
            if reason is None:
                break
            skipped += f"; not {name}: {reason}"
    else:
        reason = unavailable(choice)
        if reason is not None:
            raise BackendError(f"{source}={choice!r} cannot run here: {reason}. Use 'auto' or '{op.portable}'.")
        name = choice
    _log_once(f"{op.label} backend: {name} (requested {'auto' if choice == 'auto' else f'{source}={choice}'}; "
              f"{context}{skipped})")
    return name


def from_flags(attn_backend: str | None, mamba_backend: str | None, fuse: bool = True) -> tuple[str, str]:
    """(attn, mamba) from a CLI's flags: explicit --attn_backend / --mamba_backend win, else `fuse` (VAR's
    --fuse) means "auto" and --fuse=0 the portable kernels."""
    default = (lambda op: "auto") if fuse else (lambda op: op.portable)
    attn = check_name(ATTN, attn_backend) if attn_backend is not None else default(ATTN)
    mamba = check_name(MAMBA, mamba_backend) if mamba_backend is not None else default(MAMBA)
    return attn, mamba


@functools.cache
def _log_once(message: str) -> None:
    logger.info(message)
