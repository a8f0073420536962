"""Logging for training runs: rank 0 logs INFO to stdout and log.txt, other ranks only warnings; TensorBoard
scalars and images from rank 0 only."""
import logging
import sys
from pathlib import Path

import torch

LOG_FORMAT = "[%(asctime)s %(levelname)s %(name)s] %(message)s"


def setup_logging(rank: int, out_dir: Path | None = None, level: int = logging.INFO) -> None:
    """Configure the root logger for this process (called once by train.py, never at import)."""
    handlers = [logging.StreamHandler(sys.stdout)]
    if rank == 0 and out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(Path(out_dir) / "log.txt"))
    fmt = LOG_FORMAT if rank == 0 else f"[rank{rank}] {LOG_FORMAT}"
    logging.basicConfig(level=level if rank == 0 else logging.WARNING, format=fmt, datefmt="%m-%d %H:%M:%S",
                        handlers=handlers, force=True)


class TBLogger:
    """SummaryWriter on rank 0, a no-op elsewhere (or when tensorboard is not installed)."""

    def __init__(self, log_dir: Path | None, enabled: bool):
        self.writer = None
        if enabled and log_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logging.getLogger(__name__).warning("tensorboard is not installed: no TensorBoard logs")
            else:
                self.writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, step: int, prefix: str = "", **values: float) -> None:
        if self.writer is not None:
            for k, v in values.items():
                if v is not None:
                    self.writer.add_scalar(f"{prefix}{k}", float(v), global_step=step)

    def image(self, tag: str, img_3HW: torch.Tensor, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, img_3HW, global_step=step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


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
