"""Strict, explained state-dict loading (never a silent `strict=False`)."""
import fnmatch
from collections.abc import Iterable, Mapping

import torch
from torch import nn

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class StateDictMismatchError(RuntimeError):
    """A checkpoint's keys or shapes do not match the model."""


def _listed(items: list[str], max_listed: int) -> str:
    more = f", ... (+{len(items) - max_listed} more)" if len(items) > max_listed else ""
    return ", ".join(items[:max_listed]) + more


def load_state_dict_checked(module: nn.Module, state_dict: Mapping[str, torch.Tensor], ignore: Iterable[str] = (),
                            what: str = "checkpoint", max_listed: int = 5) -> list[str]:
    """Load `state_dict` into `module`, requiring the same keys and shapes.

    `ignore` holds fnmatch patterns (e.g. "blocks.*.attn.patch_nums") of keys that are dropped from the file and
    may be absent from it; the module keeps its own values for them. Returns the dropped file keys. On any other
    difference raises StateDictMismatchError naming the first `max_listed` missing, unexpected and mis-shaped keys.
    """
    patterns = tuple(ignore)

    def ignored(key: str) -> bool:
        return any(fnmatch.fnmatchcase(key, p) for p in patterns)

    own = module.state_dict()
    dropped = [k for k in state_dict if ignored(k)]
    kept = {k: v for k, v in state_dict.items() if not ignored(k)}
    missing = [k for k in own if k not in kept and not ignored(k)]
    unexpected = [k for k in kept if k not in own]
    mis_shaped = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in kept.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if missing or unexpected or mis_shaped:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_listed(missing, max_listed)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_listed(unexpected, max_listed)}")
        if mis_shaped:
            parts.append(f"{len(mis_shaped)} shape mismatch(es): {_listed(mis_shaped, max_listed)}")
        hint = ""
        wrapped = [p for p in _WRAPPER_PREFIXES if unexpected and all(k.startswith(p) for k in unexpected)]
        if wrapped:
            hint = f" The file's keys start with {wrapped[0]!r}: it was saved from a DDP/compiled wrapper; unwrap it."
        raise StateDictMismatchError(f"{what} does not match the model: " + "; ".join(parts) + "." + hint)
    module.load_state_dict(kept, strict=False)
    return dropped
