"""Image conversions and PNG output: a grid with one row per class, or a folder of single PNGs."""
from pathlib import Path
from collections.abc import Sequence

import numpy as np
import torch
import torchvision.utils
from PIL import Image


def to_uint8_BHW3(img_B3HW: torch.Tensor) -> np.ndarray:
    """Images in [0, 1], (B, 3, H, W), any float dtype -> uint8 (B, H, W, 3) on the CPU (round to nearest)."""
    return img_B3HW.float().clamp(0, 1).mul(255).add_(0.5).floor_().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def is_image_file(path: Path) -> bool:
    """True when `path` ends in an image format PIL can write (.png, .jpg, .webp, ...), else it names a folder."""
    fmt = Image.registered_extensions().get(Path(path).suffix.lower())
    return fmt is not None and fmt in Image.SAVE


def save_grid(imgs_BHW3: np.ndarray, path: Path, ncol: int, padding: int = 2) -> Path:
    """Save uint8 images (B, H, W, 3) as one image (format from the suffix), `ncol` per row (row r = images
    r*ncol ... r*ncol+ncol-1)."""
    if imgs_BHW3.dtype != np.uint8 or imgs_BHW3.ndim != 4:
        raise ValueError(f"expected uint8 (B, H, W, 3) images, got {imgs_BHW3.dtype} {imgs_BHW3.shape}")
    t_B3HW = torch.from_numpy(imgs_BHW3).permute(0, 3, 1, 2)
    grid_3HW = torchvision.utils.make_grid(t_B3HW, nrow=ncol, padding=padding, pad_value=255)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid_3HW.permute(1, 2, 0).numpy()).save(path)
    return path


def save_folder(imgs_BHW3: np.ndarray, folder: Path, names: Sequence[str]) -> Path:
    """Save each image as `folder/{name}.png`."""
    if len(names) != len(imgs_BHW3):
        raise ValueError(f"{len(names)} names for {len(imgs_BHW3)} images")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for img, name in zip(imgs_BHW3, names, strict=True):
        Image.fromarray(img).save(folder / f"{name}.png")
    return folder
