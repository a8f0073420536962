"""Seeds and RNG states of a training run (train.py and tokenizer_trainer.py): the initial weights come from `seed`
alone (the same for any world size); then rank r of W draws from seed * W + r (VAR's rule), for torch, Python and
NumPy. A checkpoint holds every rank's generator states, so a resumed run draws what the uninterrupted one would.
"""
import logging
import random
from typing import Any

import numpy as np
import torch

import dist
from utils.run.log import SAME_ON_ALL_RANKS

logger = logging.getLogger(__name__)


SEED_LIMIT = 2**40  # the data order's seed (seed * 1_000_003 + epoch) and the re-initialisation's must fit 63 bits


def seed_problem(seed: int | None) -> str:
    """Why `--seed` cannot seed a run ("" when it can): torch's generators take 64 bits, and the seeds derived from it
    multiply it by about a million (it failed at the first batch, after the model was built); the evaluations' image
    seeds (NumPy's SeedSequence) take no negative one."""
    if seed is None or 0 <= seed < SEED_LIMIT:
        return ""
    return f"--seed={seed}: expected 0 <= seed < 2**40"


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
            logger.warning("--seed=%s ignored: resuming with the checkpoint's seed %s", seed, saved,
                           extra=SAME_ON_ALL_RANKS)
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
                       "run is not bit-exact)", len(states), dist.get_world_size(), extra=SAME_ON_ALL_RANKS)
