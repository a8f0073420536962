"""Distributed helpers: torchrun initialisation (NCCL / gloo / single process), rank queries, metric
all-reduce, DDP / FSDP2 wrapping and `unwrap_model`."""
from dist.core import (
    all_gather_cat, all_gather_object, all_reduce_mean, all_reduce_sum, barrier, broadcast, broadcast_object, finalize,
    get_local_rank, get_rank, get_world_size, initialize, initialized, is_main_process, LaunchError,
    raised_on_every_rank, run_then_finalize, SHARDED_JOB_WAIT_MIN, timeout,
)
from dist.wrap import (
    full_model_state_dict, full_optimizer_state_dict, grad_sync, is_fsdp, load_full_state, unwrap_model, wrap_model,
)

__all__ = [
    "all_gather_cat", "all_gather_object", "all_reduce_mean", "all_reduce_sum", "barrier", "broadcast",
    "broadcast_object", "finalize", "get_local_rank", "get_rank", "get_world_size", "initialize", "initialized",
    "is_main_process", "LaunchError", "raised_on_every_rank", "run_then_finalize", "SHARDED_JOB_WAIT_MIN", "timeout",
    "full_model_state_dict", "full_optimizer_state_dict", "grad_sync", "is_fsdp", "load_full_state", "unwrap_model",
    "wrap_model",
]
