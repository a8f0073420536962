"""Process-group setup from torchrun's environment, rank queries and small collectives.

Without torchrun (no WORLD_SIZE in the environment) everything runs as a single process and the collectives
below are no-ops, so the same training code runs on a laptop CPU and on many GPU nodes.
"""
import contextlib
import datetime
import gc
import logging
import os
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as tdist

logger = logging.getLogger(__name__)

T = TypeVar("T")
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
RENDEZVOUS_NOTICE_S = 60.0  # a process group not formed by then: say what it waits for (the default wait is 30 min)


class LaunchError(ValueError):
    """The process's launch environment does not describe a process group it can join (the CLIs print it)."""


# How long the ranks of a sharded job (a token extraction, an FID dump) wait for each other where they meet: shares
# may end hours apart (image sizes differ by class; a resumed job's ranks have unequal work left), and the default 30
# minutes would fail the job just before its end. A rank that fails ends the others at once (torchrun), so the long
# wait never hides one.
SHARDED_JOB_WAIT_MIN = 24 * 60
_timeout = datetime.timedelta(minutes=30.0)  # `initialize`'s timeout_min, for the groups made after it (`timeout`)


def initialize(backend: str = "auto", timeout_min: float = 30.0) -> torch.device:
    """Join the process group described by torchrun's environment and return this process's device.

    backend "auto" picks NCCL when CUDA is available and gloo otherwise. LOCAL_RANK selects the GPU, so nodes
    may hold different numbers of GPUs. Without WORLD_SIZE (a plain `python train.py`) nothing is initialised.
    """
    global _timeout
    _timeout = datetime.timedelta(minutes=timeout_min)
    use_cuda = torch.cuda.is_available()
    if "WORLD_SIZE" not in os.environ:
        return torch.device("cuda", 0) if use_cuda else torch.device("cpu")
    missing = [v for v in TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise LaunchError(f"WORLD_SIZE is set but {', '.join(missing)} not: launch with torchrun (or set all of "
                          f"{', '.join(TORCHRUN_VARS)}; unset WORLD_SIZE for one process)")
    local_rank = int(os.environ["LOCAL_RANK"])
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise LaunchError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPUs are visible: "
                              f"lower --nproc_per_node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    if not tdist.is_initialized():
        rank, ranks = f"rank {os.environ['RANK']}", f"the {os.environ['WORLD_SIZE']} ranks"
        where = f"at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        notice = threading.Timer(RENDEZVOUS_NOTICE_S, print, (
            f"{rank}: still waiting, after {RENDEZVOUS_NOTICE_S:g} s, for {ranks} to meet {where} (every node "
            f"launched, with the same --nnodes and master address?); giving up after {timeout_min:g} min",),
            dict(file=sys.stderr, flush=True))
        notice.daemon = True
        notice.start()
        try:
            tdist.init_process_group(backend=backend, timeout=_timeout,
                                     device_id=device if backend == "nccl" else None)
        except tdist.DistStoreError as e:  # the ranks did not all meet in time: one error line, not a traceback
            raise LaunchError(f"{rank}: {ranks} did not all meet {where} within {timeout_min:g} min ({e}); was every "
                              "node launched, with the same --nnodes and master address?") from e
        except tdist.DistNetworkError as e:  # rank 0 cannot listen there (a port in use), or a rank cannot reach it
            raise LaunchError(f"{rank}: no connection {where} ({e}); is the port free on the master node (else pick "
                              "another with torchrun --master_port), and is its address reachable from this node?"
                              ) from e
        finally:
            notice.cancel()
    logger.debug("rank %d/%d (local %d) on %s with %s", get_rank(), get_world_size(), local_rank, device, backend)
    return device


def finalize() -> None:
    """Leave the process group (safe to call when none was joined).

    Call it once the models that use the group are out of scope, after `main()` returns (`run_then_finalize`).
    DDP/FSDP2 modules sit in reference cycles, so they are collected here first: left to interpreter shutdown,
    gloo's worker threads may free their tensors after Python is gone and the process dies with SIGABRT
    ("terminate called without an active exception"), seen in about 1 in 20 two-rank FSDP2 runs before this.
    """
    if tdist.is_initialized():
        gc.collect()
        tdist.destroy_process_group()


def run_then_finalize(main: Callable[..., T], *args: Any) -> T:
    """`main(*args)`, then `finalize()`. On an error the traceback's frames are cleared first (the printed
    traceback keeps its lines), so the models held by main's locals are gone before the group is destroyed."""
    try:
        return main(*args)
    except BaseException as e:
        traceback.clear_frames(e.__traceback__)
        raise
    finally:
        finalize()


def timeout() -> datetime.timedelta:
    """How long the ranks wait for each other at a collective (`initialize`'s timeout_min): a group made later with
    `tdist.new_group` must be given it, else it takes torch's default (30 min) whatever --dist_timeout_min says."""
    return _timeout


def initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def get_rank() -> int:
    return tdist.get_rank() if initialized() else 0


def get_world_size() -> int:
    return tdist.get_world_size() if initialized() else 1


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0)) if initialized() else 0


def is_main_process() -> bool:
    """True on global rank 0, the process that logs and writes the run's files (node-local output folders also have
    a checkpoint writer per node: utils.run.checkpoint.is_checkpoint_writer)."""
    return get_rank() == 0


def barrier() -> None:
    if initialized():
        tdist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of `t` over all ranks, in place (returns `t`)."""
    if initialized():
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        t.div_(get_world_size())
    return t


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of `t` over all ranks, in place (returns `t`)."""
    if initialized():
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def broadcast(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank `src`'s `t` on every rank, in place (returns `t`)."""
    if initialized():
        tdist.broadcast(t, src=src)
    return t


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Every rank's `t` (the same shape on all) concatenated along dim 0 in rank order: a global batch's rows as
    one process holding all of it would have them (rank r takes the r-th slice of each global batch)."""
    if not initialized():
        return t
    parts = [torch.empty_like(t) for _ in range(get_world_size())]
    tdist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (a one-element list without a process group)."""
    if not initialized():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    tdist.all_gather_object(out, obj)
    return out


@contextlib.contextmanager
def raised_on_every_rank(*types: type[Exception]) -> Iterator[None]:
    """Collective: run the block on every rank; where it raises one of `types` on some ranks, every rank raises
    (a failing rank its own exception, the others the first failing rank's message as `types[0]`), so no rank is
    left waiting at a later collective for one that left (a damaged checkpoint or a full disk on one node)."""
    error: Exception | None = None
    try:
        yield
    except types as e:
        error = e
    failed = [f for f in all_gather_object(None if error is None else f"rank {get_rank()}: {error}") if f is not None]
    if error is not None:
        raise error
    if failed:
        raise types[0](failed[0])


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank."""
    if not initialized():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]
