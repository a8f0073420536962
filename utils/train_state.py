"""What a training run keeps in its output folder and its RNGs; shared by train.py and tokenizer_trainer.py.

The rules, the same for both trainers:
- seeding: the initial weights come from `seed` alone (the same for any world size); then rank r of W draws from
  seed * W + r (VAR's rule), for torch, Python and NumPy.
- saving (collective): every rank's RNG state is gathered; the writers (rank 0, plus local rank 0 of every node
  whose output folder is not shared with rank 0) write `<prefix>-last.pth` atomically, the previous one renamed to
  `<prefix>-prev.pth` first.
- resuming: `-last`, else `-prev` (a kill between the two renames of a save leaves only `-prev`), else the
  caller's fallback; an unreadable `-last` is an error that points at `-prev`. All ranks must resume from the same
  position.
- temporary files of saves that were killed are removed when the run starts.
"""
import logging
import os
import random
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

import dist
from utils.checkpoint import CheckpointError, load_checkpoint, save_atomic, temp_file_pid
from utils.run_lock import RunLock, lock_output_folder, pid_alive

logger = logging.getLogger(__name__)

POSITION_KEYS = ("epoch", "iter", "step")  # where a checkpoint resumes: (epoch, iter) for M-VAR, step for tokenizers


# ---- seeding and RNG states ---------------------------------------------------------------------------------------
def seed_everything(seed: int, rank: int, world_size: int) -> None:
    """Different, reproducible streams per rank (seed * world + rank), as VAR."""
    s = seed * world_size + rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def resolve_seed(seed: int | None, ckpt: dict[str, Any] | None) -> int:
    """The run's seed: a resumed run keeps its checkpoint's; else `seed`, else one drawn on rank 0 (collective)."""
    saved = ckpt.get("args", {}).get("seed") if ckpt is not None else None
    if saved is not None:
        if seed is not None and seed != saved:
            logger.warning("--seed=%s ignored: resuming with the checkpoint's seed %s", seed, saved)
        return saved
    if seed is None:
        seed = dist.broadcast_object(random.SystemRandom().randrange(2**31) if dist.is_main_process() else None)
    return seed


def get_rng_state() -> dict[str, Any]:
    """torch (CPU and current CUDA device), Python and NumPy generator states, in weights_only-loadable types."""
    mt, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (mt, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `get_rng_state` captured."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    mt, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((mt, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's RNG state, in rank order (collective)."""
    return dist.all_gather_object(get_rng_state())


def restore_rng_states(states: list[dict[str, Any]]) -> None:
    """This rank's state from `gather_rng_states`; with another world size the streams restart (warned)."""
    if len(states) == dist.get_world_size():
        set_rng_state(states[dist.get_rank()])
    else:
        logger.warning("the checkpoint holds RNG states of %d ranks, this run has %d: not restoring them (the resumed "
                       "run is not bit-exact)", len(states), dist.get_world_size())


# ---- the output folder ----------------------------------------------------------------------------------------------
def is_checkpoint_writer(out_dir: Path) -> bool:
    """Rank 0 writes checkpoints; on other nodes, local rank 0 also writes when the output folder is not shared
    (so every node can resume from its own copy). Collective."""
    token = dist.broadcast_object(uuid.uuid4().hex if dist.is_main_process() else None)
    marker = out_dir / ".run_token"
    if dist.is_main_process():
        marker.write_text(token)
    dist.barrier()
    if dist.is_main_process():
        return True
    shared = marker.is_file() and marker.read_text() == token
    return dist.get_local_rank() == 0 and not shared


class RunFolder:
    """A run's output folder and its checkpoint files `<prefix>-last.pth`, `-prev.pth` and `-best.pth`.

    `open` (collective) creates it, takes its run lock (utils.run_lock), decides which ranks write and removes
    stale temporary files; `rank0_state`:
    the saved state is complete on rank 0 only (FSDP2 gathers there), so only rank 0 writes.
    """

    def __init__(self, out_dir: str | os.PathLike, prefix: str):
        self.dir = Path(out_dir)
        self.last, self.prev, self.best = (self.dir / f"{prefix}-{kind}.pth" for kind in ("last", "prev", "best"))
        self.writer = False
        self.lock: RunLock | None = None

    def open(self, rank0_state: bool = False) -> None:
        if dist.is_main_process():
            self.dir.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        node_writer = is_checkpoint_writer(self.dir)
        self.lock = lock_output_folder(self.dir, holder=node_writer)  # one live run per folder, until exit
        self.writer = node_writer and (dist.is_main_process() or not rank0_state)
        if self.writer:
            self.remove_stale_temp_files()
        dist.barrier()

    def remove_stale_temp_files(self) -> list[Path]:
        """Delete the temporary files of killed saves of this folder's checkpoints (a live process's are kept)."""
        names = tuple(p.name for p in (self.last, self.prev, self.best))
        removed = []
        for path in self.dir.iterdir():
            pid = temp_file_pid(path, names)
            if pid is not None and (pid == os.getpid() or not pid_alive(pid)):
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
        Collective: raises CheckpointError when the ranks would resume from different positions."""
        path = self.find_resume()
        if path is not None and fallback:
            logger.warning("--resume=%s ignored: %s has its own checkpoint %s", fallback, self.dir, path.name)
        elif fallback:
            path = Path(fallback)
        try:
            ckpt = load_checkpoint(path) if path is not None else None
        except CheckpointError as e:
            if path == self.last and self.prev.is_file():
                raise CheckpointError(f"{e}; the previous checkpoint {self.prev} is intact: move the bad file "
                                      f"aside and re-run to resume from it") from e
            raise
        positions = dist.all_gather_object(None if ckpt is None else tuple(ckpt.get(k) for k in POSITION_KEYS))
        if len(set(positions)) > 1:  # e.g. nodes with their own output folders, some without a checkpoint
            raise CheckpointError(f"the ranks would resume from different positions {positions} (None: from scratch;"
                                  f" {POSITION_KEYS}): put the same checkpoint in every node's {self.dir}")
        return path, ckpt

    def save(self, ckpt: dict[str, Any] | None, best: bool = False) -> None:
        """Collective: writers save `ckpt` atomically as `-last` (keeping the old one as `-prev`), and as `-best`
        when `best`; then all ranks wait for them."""
        if self.writer:
            t0 = time.time()
            save_atomic(ckpt, self.last, keep_previous=self.prev)
            if best:
                save_atomic(ckpt, self.best)
            position = ", ".join(f"{k} {ckpt[k]}" for k in POSITION_KEYS if k in ckpt)
            logger.info("saved checkpoint %s (%s) in %.1fs", self.last, position, time.time() - t0)
        dist.barrier()
