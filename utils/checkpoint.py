"""Checkpoint files: atomic writes that keep the previous file, safe reads with errors naming the file.

train.py's output folder holds `ar-ckpt-last.pth` (newest), `ar-ckpt-prev.pth` (the one before it, kept so a
damaged newest file never leaves a run without a good checkpoint) and `ar-ckpt-best.pth` (lowest val loss); the
rules for writing and resuming them are in utils.train_state.
"""
import errno
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

logger = logging.getLogger(__name__)

LAST, PREV, BEST = "ar-ckpt-last.pth", "ar-ckpt-prev.pth", "ar-ckpt-best.pth"
PathLike = str | os.PathLike


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit this run; the message names the file."""


def temp_path(path: Path, pid: int | None = None) -> Path:
    """Where `save_atomic` writes `path` before renaming it: a hidden file named after it and the writer's pid."""
    return path.with_name(f".{path.name}.tmp{os.getpid() if pid is None else pid}")


def temp_file_pid(path: Path, names: tuple[str, ...]) -> int | None:
    """The writer's pid if `path` is a `temp_path` of one of the file names `names`, else None."""
    for name in names:
        m = re.fullmatch(rf"\.{re.escape(name)}\.tmp(\d+)", path.name)
        if m:
            return int(m.group(1))
    return None


def write_atomic(path: PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """`write(file)` into a temporary file next to `path`, then a rename over `path`: a kill leaves the old file or
    the new one, never a partial one (for small result files; checkpoints use `save_atomic`)."""
    path = Path(path)
    tmp = temp_path(path)
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)
    return path


def save_atomic(obj: Any, path: PathLike, keep_previous: PathLike | None = None) -> Path:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`.

    With `keep_previous`, an existing `path` is first renamed to that name, so a good older file always
    survives. A kill at any moment leaves either the old or the new file complete, never a partial one; a full
    disk is a CheckpointError naming the folder, with the old files untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        if not is_disk_full(e):
            raise
        raise CheckpointError(f"disk full: cannot write {path.name} into {path.parent} ({e}; "
                              f"{shutil.disk_usage(path.parent).free / 2**20:.0f} MiB free). The previous checkpoint "
                              f"there is kept: free some space and re-run to resume from it") from e
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def is_disk_full(e: BaseException) -> bool:
    """ENOSPC/EDQUOT from a file object, or torch's zip writer failing mid-file (`inline_container.cc`), which
    is how a full disk shows when torch writes the file itself."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    return "inline_container.cc" in str(e)


def load_checkpoint(path: PathLike, mmap: bool = True) -> dict[str, Any]:
    """Read a checkpoint on the CPU (weights_only; by default memory-mapped so the ranks of a node share the
    pages); CheckpointError naming the file if it is unreadable. `mmap=False` for files written elsewhere."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # truncated, zero-filled, not a torch file, ...
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(ckpt).__name__}, expected a dict")
    return ckpt
