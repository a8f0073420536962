"""Model wrapping for data parallelism (DDP, or FSDP2 `fully_shard`) and the one `unwrap_model` helper."""
import contextlib

import torch
from torch import nn

from dist.core import initialized


def wrap_model(model: nn.Module, device: torch.device, fsdp: bool = False) -> nn.Module:
    """DDP (or FSDP2 with `fsdp`) when a process group exists; the model itself for a single process.

    FSDP2 shards every block, then the root module, in place (`fully_shard` returns the same module object); the
    model's `autoregressive_infer_cfg`, when it has one, gathers the parameters as `forward` does (collective: every
    rank must call it).
    """
    if not initialized():
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        for block in getattr(model, "blocks", ()):
            fully_shard(block)
        model = fully_shard(model)
        if hasattr(model, "autoregressive_infer_cfg"):
            register_fsdp_forward_method(model, "autoregressive_infer_cfg")
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=False)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under DDP and/or torch.compile wrappers (in any order)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def is_fsdp(model: nn.Module) -> bool:
    """True when `model` was sharded with FSDP2's `fully_shard`."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover (old torch)
        return False
    return isinstance(unwrap_model(model), FSDPModule)


def grad_sync(model: nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
    """Context for one micro-step: with `enabled` False, gradients stay local (DDP `no_sync`, FSDP2's
    `set_requires_gradient_sync(False)`); the final micro-step of an accumulation window syncs."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext() if enabled else model.no_sync()
    if is_fsdp(model):
        unwrap_model(model).set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def full_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict (names without DDP/compile prefixes). Collective under FSDP2, where only rank 0
    receives it (on the CPU) and other ranks get an empty dict."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(unwrap_model(model), options=StateDictOptions(full_state_dict=True,
                                                                                   cpu_offload=True))
    return unwrap_model(model).state_dict()


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state keyed by parameter name, so DDP, FSDP2 and single-process checkpoints resume into each
    other. Under FSDP2 it is unsharded on rank 0 only (collective), as `full_model_state_dict`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    fsdp = is_fsdp(model)
    return get_optimizer_state_dict(unwrap_model(model), optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=fsdp))


def load_full_state(model: nn.Module, model_sd: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer | None,
                    optim_sd: dict | None) -> None:
    """Load full (unsharded) model / optimizer states into a plain, DDP or FSDP2 model; strict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, \
        set_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, strict=True)
    if is_fsdp(model):
        set_model_state_dict(unwrap_model(model), model_sd, options=opts)
    else:
        unwrap_model(model).load_state_dict(model_sd, strict=True)
    if optimizer is not None and optim_sd is not None:
        set_optimizer_state_dict(unwrap_model(model), optimizer, optim_sd, options=opts)
