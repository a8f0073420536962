"""Optional loss terms of tokenizer training: a PatchGAN discriminator with hinge losses, and LPIPS when its
weights are available offline.

Shape legend: B batch, H/W image size; images are in [-1, 1].
"""
import logging
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

# torchvision's VGG16 file that `lpips.LPIPS(net="vgg")` loads through torch.hub (it downloads it when absent).
VGG16_FILE = "vgg16-397923af.pth"


def norm_groups(channels: int) -> int:
    """The PatchGAN's GroupNorm groups: min(32, channels / 4), or the largest divisor of `channels` below it."""
    groups = max(1, min(32, channels // 4))
    while channels % groups:
        groups -= 1
    return groups


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix) discriminator: stride-2 4x4 convs, GroupNorm (pix2pix and taming-transformers use
    BatchNorm; GroupNorm is batch-size independent, so DDP needs no SyncBatchNorm), LeakyReLU 0.2; outputs one
    real/fake logit per overlapping patch, (B, 1, h, w)."""

    def __init__(self, in_channels: int = 3, ch: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ch, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        c_in = ch
        for i in range(1, n_layers + 1):
            c_out = ch * min(2 ** i, 8)
            stride = 2 if i < n_layers else 1
            layers += [nn.Conv2d(c_in, c_out, 4, stride=stride, padding=1, bias=False),
                       nn.GroupNorm(norm_groups(c_out), c_out), nn.LeakyReLU(0.2, True)]
            c_in = c_out
        layers.append(nn.Conv2d(c_in, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        return self.main(img_B3HW)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: mean(relu(1 - D(real))) + mean(relu(1 + D(fake))), halved."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator side of the hinge GAN: -mean(D(fake))."""
    return -logits_fake.mean()


def adaptive_gan_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None, scale: float = 1.0
                        ) -> torch.Tensor:
    """VQGAN's weight of the generator term (Esser et al. 2021, eq. 7; taming-transformers' 1e-4 and 1e4): the norm
    of the reconstruction loss's gradient over that of `g_loss`'s, both at `last_layer` (the decoder's output conv
    weight), clamped to [0, 1e4] and detached. `reduce` (dist.all_reduce_mean) averages the two gradients over the
    ranks first, so every rank takes the weight one process with the global batch would. `scale` (fp16's loss
    scale) multiplies both losses before the gradients and divides them after, so that they do not underflow fp16.
    NaN when either gradient is non-finite (under fp16: it overflowed at this scale), never a silent 0 or 1e4."""
    rec_grad, = torch.autograd.grad(rec_loss * scale, last_layer, retain_graph=True)
    g_grad, = torch.autograd.grad(g_loss * scale, last_layer, retain_graph=True)
    if reduce is not None:
        rec_grad, g_grad = reduce(torch.stack([rec_grad, g_grad]))
    rec_norm, g_norm = rec_grad.norm() / scale, g_grad.norm() / scale
    weight = (rec_norm / (g_norm + 1e-4)).clamp(0.0, 1e4)
    return torch.where(rec_norm.isfinite() & g_norm.isfinite(), weight, math.nan).detach()


def perceptual_loss_problem() -> str:
    """Why LPIPS-VGG cannot be built offline here ("" when it can).

    The `lpips` package ships its linear-layer weights, but the VGG16 backbone comes from torchvision through
    torch.hub, which downloads it when it is not cached: offline runs therefore need that file in the cache.
    """
    try:
        import lpips  # noqa: F401
    except ImportError:
        return "the lpips package is not installed (pip install lpips)"
    vgg = Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE
    if not vgg.is_file():
        return f"torchvision's VGG16 weights are not cached at {vgg} (lpips would download them)"
    return ""


def build_perceptual_loss(device: torch.device) -> tuple[nn.Module | None, str]:
    """(LPIPS-VGG module, "") when usable offline, else (None, why not: `perceptual_loss_problem`)."""
    if why := perceptual_loss_problem():
        return None, why
    import lpips

    return lpips.LPIPS(net="vgg", verbose=False).to(device).eval().requires_grad_(False), ""
