"""Where a training run's checkpoints are written and resumed (train.py and tokenizer_trainer.py alike).

The output folder holds `<prefix>-last.pth` (newest), `<prefix>-prev.pth` (the one before it, kept so a damaged
newest file never leaves a run without a good checkpoint) and `<prefix>-best.pth` (lowest val loss); train.py's
prefix is `ar-ckpt`. The rules:
- saving (collective): every rank's RNG state is gathered (utils.run.rng); the writers (rank 0, plus local rank 0
  of every node whose output folder is not shared with rank 0) write `-last` atomically, the previous one renamed
  to `-prev` first; a full disk keeps the old files.
- resuming: `-last`, else `-prev` (a kill between the two renames of a save leaves only `-prev`), else the
  caller's fallback. Every file carries the digest of its tensors (models.loading.with_digest); a damaged `-last`
  (unreadable, or not matching its digest) falls back to an intact `-prev`, with a warning, and the next save
  replaces the damaged file instead of rotating `-prev` out. All ranks must resume from the same position. Files
  are read by models.loading.load_checkpoint.
- setting aside: a run that stops because training diverged renames the checkpoint the divergence started from
  to `<prefix>-diverged.pth` (`-diverged-2.pth` and on for later ones; `set_aside`), so that a relaunch resumes from
  the one before it.
- one live run per folder (utils.run.lock); temporary files of killed saves are removed when the run starts.
What a checkpoint holds is the trainer's to say (`Trainer.checkpoint` / `Trainer.resume` in trainer.py); when
train.py saves is its `Checkpointer`.
"""
import contextlib
import errno
import itertools
import logging
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch

import dist
from models.loading import CheckpointError, load_checkpoint, with_digest
from utils.run.lock import RunLock, lock_output_folder, pid_alive
from utils.run.log import SAME_ON_ALL_RANKS

logger = logging.getLogger(__name__)

LAST, PREV, BEST = "ar-ckpt-last.pth", "ar-ckpt-prev.pth", "ar-ckpt-best.pth"
PathLike = str | os.PathLike
POSITION_KEYS = ("epoch", "iter", "step")  # where a checkpoint resumes: (epoch, iter) for M-VAR, step for tokenizers


def position_text(ckpt: dict[str, Any]) -> str:
    """Where `ckpt` resumes, counted as the progress lines count: "after ep 2 it 5" (saved after the line "ep 2/E it
    5/I"; its "epoch" is 1 and "iter" 5, both counted from 0 and naming the next iteration to run), "after ep 1" (a
    whole epoch), "at the start", or "at step 40" for a tokenizer."""
    if "step" in ckpt:
        return f"at step {ckpt['step']}"
    epoch, it = ckpt["epoch"], ckpt["iter"]
    if it:
        return f"after ep {epoch + 1} it {it}"
    return f"after ep {epoch}" if epoch else "at the start"


def position(ckpt: dict[str, Any] | None) -> tuple | None:
    """Where `ckpt` resumes, as comparable values of POSITION_KEYS (None: no checkpoint, from scratch)."""
    return None if ckpt is None else tuple(ckpt.get(k) for k in POSITION_KEYS)


TEMP_SUFFIX = r"\.tmp(\d+)(?:@(.+))?"  # `temp_path`'s ending: the writer's pid and @host (older names: no host)


def temp_path(path: Path, pid: int | None = None, host: str | None = None) -> Path:
    """Where `save_atomic` writes `path` before renaming it: a hidden file named after it and its writer (pid and
    host: on a shared disk a pid says nothing about another host's processes)."""
    return path.with_name(f".{path.name}.tmp{os.getpid() if pid is None else pid}@{host or socket.gethostname()}")


def temp_file_is_stale(path: Path, names: tuple[str, ...]) -> bool:
    """Whether `path` is a `temp_path` of one of the file names `names` whose writer is gone: this process (a
    killed save's pid, reused), a pid not alive on this host, or another host's writer (the caller holds the
    folder's run lock: no other run writes there). A name without a host (older saves) is judged by its pid."""
    for name in names:
        m = re.fullmatch(rf"\.{re.escape(name)}{TEMP_SUFFIX}", path.name)
        if m:
            pid, host = int(m.group(1)), m.group(2)
            return (host is not None and host != socket.gethostname()) or pid == os.getpid() or not pid_alive(pid)
    return False


class DiskFullError(RuntimeError):
    """No space left while writing; the message names the file and what was kept."""


@contextlib.contextmanager
def disk_full_is_an_error(path: Path, kept: str, error: type[Exception] = DiskFullError) -> Iterator[None]:
    """Turn a full disk (`is_disk_full`) while writing `path` into `error` naming it, the free space and `kept`
    (what survives and how to go on)."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        if not is_disk_full(e):
            raise
        raise error(f"disk full: cannot write {path.name} into {path.parent} ({e}; "
                    f"{shutil.disk_usage(path.parent).free / 2**20:.0f} MiB free). {kept}") from e


def allocate(path: PathLike) -> None:
    """Reserve the disk blocks of the (sparse) file `path` now, so that a full disk is an OSError here (callers wrap
    it in `disk_full_is_an_error`) rather than a SIGBUS at a later write through a memory map. Systems and file
    systems without fallocate leave the file sparse."""
    if not hasattr(os, "posix_fallocate"):  # Linux has it; macOS does not
        return
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise


def write_atomic(path: PathLike, write: Callable[[BinaryIO], object], exclusive: bool = False) -> Path:
    """`write(file)` into a temporary file next to `path`, then a rename over `path`: a kill leaves the old file or
    the new one, never a partial one, and a failed write leaves no temporary file (for small result files;
    checkpoints use `save_atomic`). `exclusive`: FileExistsError instead of replacing an existing `path`, so a
    check-then-write of two processes cannot both succeed (a hard link, atomic like the rename)."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename: a crash leaves no empty file under the name
        (os.link if exclusive else os.replace)(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomic(path: PathLike, text: str, exclusive: bool = False) -> Path:
    """`write_atomic` of UTF-8 text (a JSON result, a report)."""
    return write_atomic(path, lambda f: f.write(text.encode()), exclusive)


def save_atomic(obj: Any, path: PathLike, keep_previous: PathLike | None = None) -> Path:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`.

    With `keep_previous`, an existing `path` is first renamed to that name, so a good older file always
    survives. A kill at any moment leaves either the old or the new file complete, never a partial one; a full
    disk, or any other failed write (a read-only folder, an I/O error, a stale NFS handle), is a CheckpointError
    naming the folder, with the old files kept.
    """
    path = Path(path)
    tmp = temp_path(path)
    kept = "The previous checkpoint there is kept"
    try:
        with disk_full_is_an_error(path, f"{kept}: free some space and re-run to resume from it", CheckpointError):
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
            if keep_previous is not None and path.exists():
                os.replace(path, keep_previous)
            os.replace(tmp, path)
    except OSError as e:
        raise CheckpointError(f"cannot write {path.name} into {path.parent} ({type(e).__name__}: {e}). {kept}: "
                              "once the folder can be written again, re-run to resume from it") from e
    finally:
        tmp.unlink(missing_ok=True)
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


def is_checkpoint_writer(out_dir: Path) -> bool:
    """Rank 0 writes checkpoints; on other nodes, local rank 0 also writes when the output folder is not shared
    (so every node can resume from its own copy: rank 0's token file is not there). Collective; the token file is
    gone again when it returns."""
    if not dist.initialized():
        return True
    token = dist.broadcast_object(uuid.uuid4().hex if dist.is_main_process() else None)
    marker = out_dir / ".run_token"
    if dist.is_main_process():
        marker.write_text(token)
    dist.barrier()
    shared = marker.is_file() and marker.read_text() == token
    dist.barrier()  # every rank has looked
    if dist.is_main_process():
        marker.unlink()
        return True
    return dist.get_local_rank() == 0 and not shared


class OutputFolderError(ValueError):
    """An output folder that cannot be created or written into (the scripts print it as one error line)."""


def check_writable(folder: Path, flag: str, create: bool = True) -> None:
    """Write a probe file in `folder`, so an unwritable output fails before any work (OutputFolderError naming
    `flag`). `create`: make the folder first; else a missing one is probed in its nearest existing ancestor and
    nothing is made, so a run that fails a later check leaves no empty folder (the writer makes it)."""
    probed = folder
    if not create:
        while not probed.exists() and probed != probed.parent:  # False under a regular file too
            probed = probed.parent
        if not probed.is_dir():
            raise OutputFolderError(f"{flag}: cannot write into {folder} ({probed} is a file, not a folder)")
    try:
        probed.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=probed):
            pass
    except OSError as e:
        raise OutputFolderError(f"{flag}: cannot write into {folder} ({e.strerror or e})") from e


class RunFolder:
    """A run's output folder and its checkpoint files `<prefix>-last.pth`, `-prev.pth` and `-best.pth`.

    `open` (collective) creates it, takes its run lock (utils.run.lock), decides which ranks write and removes
    stale temporary files; `rank0_state`: the saved state is complete on rank 0 only (FSDP2 gathers there), so only
    rank 0 writes; `on_locked` runs once the lock is this run's (e.g. opening log.txt, which a run refused for a
    live one's folder must not write into), and the takeover of a stale lock is logged after it, into log.txt.
    """

    def __init__(self, out_dir: str | os.PathLike, prefix: str):
        self.dir, self.prefix = Path(out_dir), prefix
        self.last, self.prev, self.best = (self.dir / f"{prefix}-{kind}.pth" for kind in ("last", "prev", "best"))
        self.writer = False
        self.node_local = False  # the nodes each have a folder of their own (set by `open`)
        self.last_damaged = False  # resumed from -prev past a damaged -last: the next save must not rotate it in
        self.lock: RunLock | None = None

    def open(self, rank0_state: bool = False, on_locked: Callable[[], None] | None = None) -> None:
        if dist.is_main_process():
            self.dir.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        node_writer = is_checkpoint_writer(self.dir)
        own_folder = [r for r, mine in enumerate(dist.all_gather_object(node_writer and not dist.is_main_process()))
                      if mine]
        self.node_local = bool(own_folder)
        if own_folder and rank0_state:  # rank 0 alone writes: the other nodes' folders would stay empty
            raise OutputFolderError(
                f"--local_out_dir_path={self.dir}: rank(s) {', '.join(map(str, own_folder))} see a folder of their own "
                f"(not rank 0's), and under --fsdp only rank 0 writes the checkpoints (it gathers the state), so a "
                f"relaunch there would find none: put the output folder on a disk every node shares")
        self.lock = lock_output_folder(self.dir, holder=node_writer, on_locked=on_locked)  # until exit
        self.writer = node_writer and (dist.is_main_process() or not rank0_state)
        if self.writer:
            self.remove_stale_temp_files()
        dist.barrier()

    def remove_stale_temp_files(self) -> list[Path]:
        """Delete the temporary files of killed saves of this folder's checkpoints (a live process's are kept)."""
        names = tuple(p.name for p in (self.last, self.prev, self.best))
        removed = []
        for path in self.dir.iterdir():
            if temp_file_is_stale(path, names):
                path.unlink(missing_ok=True)
                removed.append(path)
        if removed:
            logger.info("removed %d temporary file(s) of interrupted saves: %s", len(removed),
                        ", ".join(p.name for p in removed))
        return removed

    def find_resume(self) -> Path | None:
        """`-last`, else `-prev` (left alone when a run died between the two renames of a save), else None."""
        return next((p for p in (self.last, self.prev) if p.is_file()), None)

    def load_resume(self, fallback: str | os.PathLike | None = None) -> tuple[Path | None, dict[str, Any] | None]:
        """(path, checkpoint) to resume from: the folder's own (`find_resume`), else `fallback`, else (None, None).
        Collective: raises CheckpointError when the ranks would resume from different positions, or on every rank
        when some cannot read theirs (node-local folders)."""
        path = self.find_resume()
        if path is not None and fallback:
            logger.warning("--resume=%s ignored: %s has its own checkpoint %s", fallback, self.dir, path.name,
                           extra=SAME_ON_ALL_RANKS)
        elif fallback:
            path = Path(fallback)
        with dist.raised_on_every_rank(CheckpointError):
            try:
                ckpt = load_checkpoint(path) if path is not None else None
            except CheckpointError as e:
                if path != self.last or not self.prev.is_file():
                    raise
                logger.warning("%s; resuming from the previous checkpoint %s instead (the next save replaces %s)", e,
                               self.prev, self.last.name, extra=SAME_ON_ALL_RANKS)
                path, ckpt, self.last_damaged = self.prev, load_checkpoint(self.prev), True
        positions = dist.all_gather_object(position(ckpt))
        if len(set(positions)) > 1 and self.node_local and None not in positions:  # the same decision on all ranks
            path, ckpt = self.newest_held_by_all(path, ckpt, positions)
            positions = dist.all_gather_object(position(ckpt))
        if len(set(positions)) > 1:  # e.g. nodes with their own output folders, some without a checkpoint
            raise CheckpointError(f"the ranks would resume from different positions {positions} (None: from scratch;"
                                  f" {POSITION_KEYS}): put the same checkpoint in every node's {self.dir}")
        if self.node_local and ckpt is None:
            logger.warning("no checkpoint in any node's own %s: starting from scratch. A job requeued onto other "
                           "nodes finds none of the copies it saved on these and starts over: for a requeueable job "
                           "put the output folder on a disk every node shares", self.dir, extra=SAME_ON_ALL_RANKS)
        return path, ckpt

    def newest_held_by_all(self, path: Path, ckpt: dict[str, Any], positions: list) -> tuple[Path, dict[str, Any]]:
        """Node-local folders one save apart (a node's save failed, or it died mid-save): the newest position that
        every rank holds as its -last or -prev, loaded; (path, ckpt) unchanged when there is none. Collective.
        Resumed from -prev, the next save replaces -last without keeping it (it is ahead of the other nodes')."""
        held = {position(ckpt): path}
        with dist.raised_on_every_rank(CheckpointError):
            if path == self.last and self.prev.is_file():  # its position only: no digest (it reads every tensor)
                held.setdefault(position(load_checkpoint(self.prev, verify=False)), self.prev)
        common = set.intersection(*(set(h) for h in dist.all_gather_object(list(held))))
        if not common:
            return path, ckpt
        newest = max(common, key=lambda pos: tuple(-1 if v is None else v for v in pos))
        with dist.raised_on_every_rank(CheckpointError):
            if held[newest] != path:
                path, ckpt, self.last_damaged = self.prev, load_checkpoint(self.prev), True
        logger.warning("the nodes' own copies of %s are not at one position %s (a save that failed or was cut on "
                       "some node): resuming from %s, the newest every node holds", self.dir, positions,
                       position_text(ckpt), extra=SAME_ON_ALL_RANKS)
        return path, ckpt

    def save(self, ckpt: dict[str, Any] | None, best: bool = False, last: bool = True) -> None:
        """Collective: writers save `ckpt` with its digest atomically as `-last` (keeping the old one as `-prev`,
        unless it was damaged), and as `-best` when `best`; with `last` False as `-best` only (a run never resumes
        from it, -last stays as it is); then all ranks wait for them (a writer's CheckpointError, a full disk, is
        raised on every rank)."""
        with dist.raised_on_every_rank(CheckpointError, OSError):  # a full or read-only disk, a stale NFS handle
            if self.writer:
                t0 = time.time()
                ckpt = with_digest(ckpt)
                if last:
                    save_atomic(ckpt, self.last, keep_previous=None if self.last_damaged else self.prev)
                    self.last_damaged = False
                if best:
                    save_atomic(ckpt, self.best)
                logger.info("saved checkpoint %s (%s) in %.1fs", self.last if last else self.best,
                            position_text(ckpt), time.time() - t0)

    def set_aside(self, kind: str) -> Path | None:
        """Collective: writers rename the newest checkpoint (`find_resume`) to `<prefix>-<kind>.pth`, so that a
        relaunch resumes from the one before it -> its new name (None: the folder had none). After a resume past a
        damaged `-last`, that is `-prev`. A name taken by an earlier one (a relaunch that diverged again) gets a
        number, `<prefix>-<kind>-2.pth` and on: each is kept."""
        path = self.prev if self.last_damaged else self.find_resume()
        aside = None
        with dist.raised_on_every_rank(OSError):
            if self.writer and path is not None:
                names = (self.dir / f"{self.prefix}-{kind}{'' if n == 1 else f'-{n}'}.pth" for n in itertools.count(1))
                aside = next(name for name in names if not name.exists())
                os.replace(path, aside)
        return dist.broadcast_object(aside)  # rank 0's (a writer), for every rank's message

    def resume_point(self) -> str:
        """Where a relaunch would resume, in words (the file is read and its digest checked)."""
        path = self.find_resume()
        if path is None:
            return f"A relaunch starts from scratch ({self.dir} holds no checkpoint)"
        try:
            return f"A relaunch resumes from {path} ({position_text(load_checkpoint(path))})"
        except CheckpointError as e:
            return f"A relaunch finds {e}"
