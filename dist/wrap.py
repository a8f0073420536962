"""Model wrapping for data parallelism (DDP, or FSDP2 `fully_shard`) and the one `unwrap_model` helper."""
import contextlib

import torch
from torch import nn

from dist.core import broadcast, initialized


def wrap_model(model: nn.Module, device: torch.device, fsdp: bool = False) -> nn.Module:
    """DDP (or FSDP2 with `fsdp`) when a process group exists; the model itself for a single process.

    Both start every rank from rank 0's weights: DDP broadcasts them; before FSDP2 shards every block, then the
    root module, in place (`fully_shard` returns the same module object, and each rank keeps its slice of what it
    holds), they are broadcast here, so that ranks whose initialisations differ (an RNG draw on one rank only,
    GPUs whose random kernels split the work otherwise) cannot train a model stitched from several; the
    `_no_weight_decay` flags move to the sharded parameters. The model's
    `autoregressive_infer_cfg`, when it has one, gathers the parameters as `forward` does (collective: every rank
    must call it).
    """
    if not initialized():
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        with torch.no_grad():
            for tensor in model.state_dict().values():
                broadcast(tensor)

        # fully_shard replaces every parameter with a DTensor one, which drops attributes set on the old one
        no_wd = {name for name, p in model.named_parameters() if getattr(p, "_no_weight_decay", False)}
        for block in getattr(model, "blocks", ()):
            fully_shard(block)
        model = fully_shard(model)
        for name, p in model.named_parameters():
            if name in no_wd:
                p._no_weight_decay = True  # read by trainer.param_groups (Mamba2's A_log, D, dt_bias)
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


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of the optimizer's parameters in its own order (the indices of `optimizer.state_dict()`)."""
    names = {p: n for n, p in unwrap_model(model).named_parameters()}
    return [names[p] for group in optimizer.param_groups for p in group["params"]]


def _rekey(optim_sd: dict, new_key: dict) -> dict:
    """`optim_sd` with every parameter key k renamed to new_key[k]."""
    return {"state": {new_key[k]: v for k, v in optim_sd["state"].items()},
            "param_groups": [{**g, "params": [new_key[k] for k in g["params"]]} for g in optim_sd["param_groups"]]}


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state keyed by parameter name, so DDP, FSDP2 and single-process checkpoints resume into each
    other. Under FSDP2 it is unsharded on rank 0 only (collective), as `full_model_state_dict`.

    Only a sharded optimizer with state goes through torch.distributed.checkpoint: on an optimizer without state
    (say the fp16 scaler skipped every step so far) it would run a fake step, leaving step=1 and zero moments."""
    if is_fsdp(model) and optimizer.state:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(unwrap_model(model), optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return _rekey(optimizer.state_dict(), dict(enumerate(_param_names(model, optimizer))))


def load_full_state(model: nn.Module, model_sd: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer | None,
                    optim_sd: dict | None) -> None:
    """Load full (unsharded) model / optimizer states into a plain, DDP or FSDP2 model; strict. The optimizer
    state may be keyed by name (ours) or by index (plain `optimizer.state_dict()`, older checkpoints)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, \
        set_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, strict=True)
    if is_fsdp(model):
        set_model_state_dict(unwrap_model(model), model_sd, options=opts)
    else:
        unwrap_model(model).load_state_dict(model_sd, strict=True)
    if optimizer is None or optim_sd is None:
        return
    names = _param_names(model, optimizer)
    saved = [k for g in optim_sd["param_groups"] for k in g["params"]]
    if all(isinstance(k, int) for k in saved):  # index-keyed: positions in this optimizer's parameter order
        optim_sd = _rekey(optim_sd, dict(zip(saved, names, strict=True)))
    listed = {k for g in optim_sd["param_groups"] for k in g["params"]}
    missing, extra = set(names) - listed, listed - set(names)
    if missing or extra:
        raise KeyError(f"the optimizer state has no entry for {sorted(missing)[:3]}" if missing else
                       f"the optimizer state has entries for parameters the model lacks: {sorted(extra)[:3]}")
    if is_fsdp(model) and optim_sd["state"]:
        set_optimizer_state_dict(unwrap_model(model), optimizer, optim_sd, options=opts)
        return
    # the optimizer's own loader matches parameters by position: lay the saved groups out in this one's order
    position, groups, start = {n: i for i, n in enumerate(names)}, [], 0
    for saved_group, group in zip(optim_sd["param_groups"], optimizer.param_groups, strict=True):
        groups.append({**saved_group, "params": list(range(start, start + len(group["params"])))})
        start += len(group["params"])
    optimizer.load_state_dict({"state": {position[n]: v for n, v in optim_sd["state"].items()},
                               "param_groups": groups})
