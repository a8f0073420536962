"""The torch features this project uses that older supported torches lack: what needs each, and since which release.

The code never imports one of these at module level: it asks `missing(name)` (or catches the ImportError) where the
feature is used, and says which feature needs which torch. The GPU check (scripts/gpu_env.py) prints the table for
the torch it finds. Releases from the PyTorch documentation of each version.
"""
import functools
import importlib
import inspect
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TorchFeature:
    """`path` is "module:attribute" (optionally "module:attribute(keyword)" for a keyword argument)."""

    path: str
    since: str
    needed_by: str

    @property
    def name(self) -> str:
        return self.path.replace(":", ".")


FEATURES = {
    "varlen_attn": TorchFeature("torch.nn.attention.varlen:varlen_attn", "2.9", "--attn_backend=torch_varlen"),
    "varlen_attn_scale": TorchFeature("torch.nn.attention.varlen:varlen_attn(scale)", "2.10",
                                      "nothing: without it torch_varlen folds the softmax scale into q"),
    "fully_shard": TorchFeature("torch.distributed.fsdp:fully_shard", "2.6", "train.py --fsdp=1 (FSDP2)"),
}


@functools.cache
def available(key: str) -> bool:
    """Whether this torch has FEATURES[key] (imports the module, never raises)."""
    module, _, attr = FEATURES[key].path.partition(":")
    attr, _, keyword = attr.rstrip(")").partition("(")
    try:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        return False
    if not keyword:
        return True
    try:
        return keyword in inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return False


def missing(key: str) -> str | None:
    """None when FEATURES[key] is available, else a sentence naming the torch, the feature and what needs it."""
    if available(key):
        return None
    f = FEATURES[key]
    return f"torch {torch.__version__} has no {f.name} (added in torch {f.since}; needed by {f.needed_by})"


def table() -> list[list[str]]:
    """[feature, since, needed by, "yes" / "no"] for every feature, for this torch."""
    return [[f.name, f.since, f.needed_by, "yes" if available(k) else "no"] for k, f in FEATURES.items()]


# pytorch/pytorch#180642: under torch.compile, an autograd.Function whose forward returns a tensor it wrote in place
# (or a no-op alias such as `.to` of its own dtype) gets silently wrong gradients. Measured here: torch 2.11.0 wrong
# for every such pattern; 2.8.0, 2.12.1, 2.13.0 and 2.14.1 right. The Mamba2 layer's Functions do both (fewer passes)
# and return fresh copies under torch.compile (`mamba2._returned`); mamba_ssm's run outside the graph on these torches.
COMPILED_FUNCTION_GRADIENTS_WRONG = ("2.11",)


def compiled_function_gradients_wrong(version: str = torch.__version__) -> bool:
    """Whether torch `version` (e.g. "2.11.0+cu130") is one whose compiled autograd.Functions get wrong gradients."""
    return ".".join(version.split("+")[0].split(".")[:2]) in COMPILED_FUNCTION_GRADIENTS_WRONG
