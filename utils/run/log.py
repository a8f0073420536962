"""Logging for training runs: rank 0 logs INFO to stdout and log.txt, other ranks only warnings (not those marked
`SAME_ON_ALL_RANKS`); TensorBoard scalars and images from rank 0 only."""
import logging
import sys
from pathlib import Path

import numpy as np
import torch

LOG_FORMAT = "[%(asctime)s %(levelname)s %(name)s] %(message)s"
SAME_ON_ALL_RANKS = {"same_on_all_ranks": True}
"""`extra=` of a warning that every rank gives alike (about the flags, the checkpoint, the data set): rank 0 alone
logs it, not each of a job's hundreds of ranks. Warnings about this rank's own work (an unreadable image, a signal)
go without it."""


def _not_same_on_all_ranks(record: logging.LogRecord) -> bool:
    return not getattr(record, "same_on_all_ranks", False)


def setup_logging(rank: int, out_dir: Path | None = None, level: int = logging.INFO) -> None:
    """Configure the root logger for this process (by the trainers, never at import): to stdout, and on rank 0 also
    to `out_dir`/log.txt when given (they call it again with the folder once its run lock is theirs)."""
    handlers = [logging.StreamHandler(sys.stdout)]
    if rank == 0 and out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(Path(out_dir) / "log.txt"))
    fmt = LOG_FORMAT if rank == 0 else f"[rank{rank}] {LOG_FORMAT}"
    if rank != 0:
        handlers[0].addFilter(_not_same_on_all_ranks)
    logging.basicConfig(level=level if rank == 0 else logging.WARNING, format=fmt, datefmt="%m-%d %H:%M:%S",
                        handlers=handlers, force=True)


TB_AXES = ("steps", "epochs", "images")  # tb/<axis>: one event folder per x axis (iterations, epochs, images seen)


class TBLogger:
    """TensorBoard on rank 0 (a no-op elsewhere, or when tensorboard is not installed): one SummaryWriter per x axis
    (`TB_AXES`), each made at its first use. A resumed run passes where each axis resumes (`purge_from`): the writer
    then tells TensorBoard to drop that axis's points from there on, those a killed run wrote after its last
    checkpoint. One writer per axis because TensorBoard purges every tag of an event folder at one step."""

    def __init__(self, log_dir: Path | None, enabled: bool, purge_from: dict[str, int] | None = None):
        self.log_dir, self.purge_from, self.writers = log_dir, purge_from or {}, {}
        self.summary_writer = None
        if enabled and log_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logging.getLogger(__name__).warning("tensorboard is not installed: no TensorBoard logs")
            else:
                self.summary_writer = SummaryWriter

    def writer(self, axis: str):
        if axis not in self.writers:
            self.writers[axis] = self.summary_writer(log_dir=str(Path(self.log_dir) / axis),
                                                     purge_step=self.purge_from.get(axis))
        return self.writers[axis]

    def scalars(self, axis: str, step: int, prefix: str = "", **values: float) -> None:
        if self.summary_writer is not None:
            for k, v in values.items():
                if v is not None:
                    self.writer(axis).add_scalar(f"{prefix}{k}", float(v), global_step=step)

    def image(self, axis: str, tag: str, img_3HW: torch.Tensor, step: int) -> None:
        if self.summary_writer is not None:
            self.writer(axis).add_image(tag, img_3HW, global_step=step)

    def flush(self) -> None:
        for writer in self.writers.values():
            writer.flush()

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()


def read_scalars(tb_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every scalar of a run's TensorBoard folder: tag -> (steps, values), as TensorBoard shows them (the points a
    resume purged left out). Also reads a folder of one writer for all axes (runs before `TB_AXES`), whose resumes
    purged nothing: there a step logged twice keeps its last value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = {}
    for folder in (tb_dir, *(tb_dir / axis for axis in TB_AXES)):
        if folder.is_dir():
            acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
            acc.Reload()
            for tag in acc.Tags()["scalars"]:
                by_step = {e.step: e.value for e in acc.Scalars(tag)}
                steps = sorted(by_step)
                scalars[tag] = np.array(steps), np.array([by_step[s] for s in steps])
    return scalars


class Averager:
    """Running means of named scalars (floats or device tensors: no sync) since the last `pop()`."""

    def __init__(self):
        self.sums: dict[str, float | torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def update(self, **values: float | torch.Tensor) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0) + 1

    def pop(self) -> dict[str, float | torch.Tensor]:
        out = {k: self.sums[k] / self.counts[k] for k in self.sums}
        self.sums, self.counts = {}, {}
        return out
