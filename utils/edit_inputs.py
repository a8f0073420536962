"""The inputs of `sample.py --edit`: an image file and a mask (a PNG, or a box) brought to the model's size.

Image and mask go through the same geometry as VAR's validation images: the shorter side resized to the model's
resolution, then a center crop. The box is in the original image's pixels. A mask pixel is "regenerate" where
the PNG is not black; a model pixel is masked when any image pixel under it is (a mask never shrinks).
"""
from pathlib import Path
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF


def box_mask(height: int, width: int, box: Sequence[int]) -> torch.Tensor:
    """A (1, 1, H, W) bool mask that is True inside the pixel box (x0, y0, x1, y1), ends exclusive."""
    x0, y0, x1, y1 = (int(v) for v in box)
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f"box {tuple(box)} (x0, y0, x1, y1) must satisfy 0 <= x0 < x1 <= {width} and "
                         f"0 <= y0 < y1 <= {height} for a {width}x{height} image")
    mask = torch.zeros(1, 1, height, width, dtype=torch.bool)
    mask[..., y0:y1, x0:x1] = True
    return mask


def parse_box(text: str) -> tuple[int, int, int, int]:
    """"x0,y0,x1,y1" -> four ints (pixels, ends exclusive)."""
    try:
        x0, y0, x1, y1 = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--box {text!r}: expected four integers x0,y0,x1,y1 (pixels of --edit's image)") from None
    return x0, y0, x1, y1


def _resized_hw(h: int, w: int, reso: int) -> tuple[int, int]:
    """The size torchvision's resize(reso) gives: shorter side reso, the other scaled (truncated)."""
    return (reso, int(reso * w / h)) if h <= w else (int(reso * h / w), reso)


def _image_to_model_size(img_3HW: torch.Tensor, reso: int) -> torch.Tensor:
    img_3HW = TF.resize(img_3HW, list(_resized_hw(*img_3HW.shape[-2:], reso)), InterpolationMode.BICUBIC,
                        antialias=True)
    return TF.center_crop(img_3HW, [reso, reso]).clamp(0, 1)


def _mask_to_model_size(mask_HW: torch.Tensor, reso: int) -> torch.Tensor:
    """A model pixel is masked when any image pixel of its footprint is (max pooling; nearest when enlarging)."""
    size = _resized_hw(*mask_HW.shape, reso)
    m_11HW = mask_HW[None, None].float()
    if size[0] <= mask_HW.shape[0]:
        m_11HW = F.adaptive_max_pool2d(m_11HW, size)
    else:
        m_11HW = F.interpolate(m_11HW, size=size, mode="nearest")
    return TF.center_crop(m_11HW, [reso, reso]) > 0


def load_edit_inputs(image_path: str | Path, reso: int, mask_path: str | Path | None = None,
                     box: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> image (1, 3, reso, reso) in [0, 1] and mask (1, 1, reso, reso) bool (True = regenerate)."""
    if (mask_path is None) == (box is None):
        raise ValueError("--edit needs exactly one of --mask MASK.png or --box x0,y0,x1,y1")
    image_path = Path(image_path)
    if not image_path.is_file():
        raise FileNotFoundError(f"--edit={image_path}: no such file")
    with Image.open(image_path) as im:
        rgb = np.array(im.convert("RGB"))
    H, W = rgb.shape[:2]
    if box is not None:
        mask_HW = box_mask(H, W, box)[0, 0]
    else:
        if not Path(mask_path).is_file():
            raise FileNotFoundError(f"--mask={mask_path}: no such file")
        with Image.open(mask_path) as m:
            mask_HW = torch.from_numpy(np.asarray(m.convert("L")) > 0)
        if mask_HW.shape != (H, W):
            raise ValueError(f"--mask={mask_path} is {mask_HW.shape[1]}x{mask_HW.shape[0]} px, --edit={image_path} "
                             f"is {W}x{H} px: the mask must have the image's size")
    img_13HW = _image_to_model_size(torch.from_numpy(rgb).permute(2, 0, 1).float().div(255), reso)[None]
    mask_11HW = _mask_to_model_size(mask_HW, reso)
    if not mask_11HW.any():
        raise ValueError("the mask covers no pixel of the (resized, center-cropped) image: nothing to regenerate")
    return img_13HW, mask_11HW
