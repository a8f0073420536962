"""Non-finite values (NaN/Inf) where images are made: the weights, checked once at load, and each batch of
generated images, checked before anything is written. The errors say what is non-finite and where it came from."""
from collections.abc import Iterable

import torch
from torch import nn


class NonFiniteValueError(RuntimeError):
    """Weights or outputs that hold NaN or Inf; the message names them."""


def nonfinite_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the floating-point tensors that hold any NaN or Inf."""
    return [name for name, t in named if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def check_finite_weights(module: nn.Module, what: str) -> None:
    """NonFiniteValueError naming the parameters and buffers of `module` (described by `what`) that hold NaN/Inf."""
    bad = nonfinite_tensors(module.state_dict().items())
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise NonFiniteValueError(f"{what} has non-finite weights (NaN/Inf) in {bad[:5]}{more}: the file is "
                                  "damaged or comes from a run that diverged")


def check_finite_images(img: torch.Tensor, where: str) -> None:
    """One reduction and one host sync per batch: NonFiniteValueError counting the NaN and Inf values of `img`."""
    if bool(torch.isfinite(img).all()):
        return
    n_nan, n_inf = int(torch.isnan(img).sum()), int(torch.isinf(img).sum())
    raise NonFiniteValueError(f"{where} produced non-finite pixels ({n_nan} NaN, {n_inf} Inf of {img.numel()} "
                              "values); no image of this batch was written")
