"""sample.py's inputs and outputs: the image and mask of `--edit`, the uint8 conversion and PNG writers (a grid
with one row per class, or a folder of single PNGs), and the checks that weights and generated images are finite.

Edit inputs: the shorter side resized to the model's resolution (bicubic), then a center crop, so that the whole
shorter side is edited (VAR's validation images are resized to 1.125 times the model's size first, with Lanczos, and
lose that margin to the crop: their objects are 12.5% larger); EXIF orientation is applied first, 16-bit images keep
their range, and large images are reduced while they are read. The box is in the original image's pixels (as
displayed). A mask pixel is "regenerate" where the PNG is not black; a model pixel is masked when any image pixel
under it is (a mask never shrinks). Non-finite weights are checked once at load, each batch of generated images
before anything is written; the errors say what is non-finite and where it came from.
"""
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.utils
from PIL import ExifTags, Image, ImageOps
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from utils.data.loaders import pixel_bits
from utils.run.checkpoint import write_atomic

EDIT_REDUCE_TO = 2  # --edit images are reduced while read to a shorter side of at least this times the model's
# the longest side of an --edit image over its shortest: the model sees the centre square, and the resize before the
# crop holds reso x reso * ratio pixels (a 200000 x 100 PNG of 59 kB took 2.4 GB at 256 px)
EDIT_MAX_ASPECT = 16
# of --edit and --mask files (not EPS: PIL renders it with Ghostscript); JPEG's opener also opens phones' MPO files
EDIT_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF", "PPM")


# ---------------------------------------------------------------------------------------------------------------------
# Edit inputs
# ---------------------------------------------------------------------------------------------------------------------
def check_box(height: int, width: int, box: Sequence[int]) -> None:
    """A ValueError unless the pixel box (x0, y0, x1, y1), ends exclusive, lies inside a `width` x `height` image
    and holds a pixel."""
    x0, y0, x1, y1 = (int(v) for v in box)
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f"box {tuple(box)} (x0, y0, x1, y1) must satisfy 0 <= x0 < x1 <= {width} and "
                         f"0 <= y0 < y1 <= {height} for a {width}x{height} image")


def box_mask(height: int, width: int, box: Sequence[int]) -> torch.Tensor:
    """A (1, 1, H, W) bool mask that is True inside the pixel box (x0, y0, x1, y1) of a `width` x `height` image,
    ends exclusive."""
    check_box(height, width, box)
    x0, y0, x1, y1 = (int(v) for v in box)
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
    """A model pixel is masked when any image pixel of its footprint is (max pooling; when enlarging, over the image
    first repeated a whole number of times: nearest interpolation could leave a footprint's masked pixel out)."""
    size = _resized_hw(*mask_HW.shape, reso)
    m_11HW = mask_HW[None, None].float()
    if size[0] > mask_HW.shape[0] or size[1] > mask_HW.shape[1]:
        k_h, k_w = -(-size[0] // mask_HW.shape[0]), -(-size[1] // mask_HW.shape[1])
        m_11HW = m_11HW.repeat_interleave(k_h, dim=2).repeat_interleave(k_w, dim=3)
    m_11HW = F.adaptive_max_pool2d(m_11HW, size)
    return TF.center_crop(m_11HW, [reso, reso]) > 0


def _any_pool(mask_HW: np.ndarray, cells: tuple[np.ndarray, np.ndarray]) -> torch.Tensor:
    """Bool (H, W) -> (h, w): a cell is True when any pixel the reading put in it is (`cells`: per row and per
    column of the full image, its cell of the reduced image, non-decreasing; see `_reduced_cells`)."""
    rows = np.logical_or.reduceat(mask_HW, np.searchsorted(cells[0], np.arange(cells[0][-1] + 1)), axis=0)
    return torch.from_numpy(np.logical_or.reduceat(rows, np.searchsorted(cells[1], np.arange(cells[1][-1] + 1)),
                                                   axis=1))


# EXIF orientation -> (displayed rows come from stored columns, displayed rows reversed, displayed columns reversed)
_ORIENTATION_AXES = {1: (False, False, False), 2: (False, False, True), 3: (False, True, True),
                     4: (False, True, False), 5: (True, False, False), 6: (True, False, True),
                     7: (True, True, True), 8: (True, True, False)}


def _reduced_cells(n: int, draft: int, reverse: bool, reduce: int) -> np.ndarray:
    """Per pixel of one displayed axis of n pixels, its cell after a JPEG draft by `draft` (blocks anchored at the
    stored image's origin, which the EXIF orientation may put at this axis's end) then PIL's reduce by `reduce`
    (anchored at the displayed origin)."""
    p = np.arange(n)
    drafted = (n - 1 - p) // draft if reverse else p // draft
    if reverse:
        drafted = -(-n // draft) - 1 - drafted
    return drafted // reduce


def open_image(path: Path, flag: str) -> Image.Image:
    """`Image.open` (the header only) of an image in one of EDIT_FORMATS; ValueError naming `flag` otherwise."""
    try:
        return Image.open(path, formats=EDIT_FORMATS)
    except (OSError, Image.DecompressionBombError) as e:  # the bomb: more pixels than PIL's guard lets through
        raise ValueError(f"{flag}={path}: not an image of the formats read here ({', '.join(EDIT_FORMATS)}): "
                         f"{e}") from e


def edit_preview_max_pixels(reso: int) -> int:
    """The most pixels `read_edit_image` returns at model size `reso`: a shorter side below 2 * EDIT_REDUCE_TO * reso
    (reduced by a whole factor from at least EDIT_REDUCE_TO * reso), the longer one at most EDIT_MAX_ASPECT times it."""
    return EDIT_MAX_ASPECT * (2 * EDIT_REDUCE_TO * reso) ** 2


def read_edit_image(path: Path, reso: int) -> tuple[torch.Tensor, tuple[int, int], tuple[np.ndarray, np.ndarray]]:
    """The image as displayed (EXIF orientation applied) -> ((3, h, w) float in [0, 1], its full size (H, W), cells).

    Large images are reduced while they are read (JPEG: decoded at 1/2 to 1/8 scale; then PIL's box reduce), to a
    shorter side of at least twice `reso`, so memory follows the model's size, not the file's. 16-bit images keep
    their range (I;16, and a PNG's I: 0-65535), palette and other modes are converted to RGB; float (F) and other
    32-bit images are refused. `cells`: per row and per column of the full image, the row or column of the returned
    image it went into (a mask or box marks those: the reduction's blocks are anchored at the file's origin).
    """
    with open_image(path, "--edit") as im:
        try:  # the pixels (and EXIF) are decoded here: a damaged file fails now
            orientation = im.getexif().get(ExifTags.Base.Orientation, 1)
            swap, rev_y, rev_x = _ORIENTATION_AXES.get(orientation, _ORIENTATION_AXES[1])
            H, W = (im.width, im.height) if swap else (im.height, im.width)  # 5-8 turn the stored image by 90 deg
            if max(H, W) > EDIT_MAX_ASPECT * min(H, W):
                raise ValueError(f"--edit={path}: {W}x{H} px, longer than {EDIT_MAX_ASPECT}:1 (the model sees its "
                                 "centre square only): crop it first")
            factor = max(1, min(H, W) // (EDIT_REDUCE_TO * reso))
            stored_w, fmt = im.width, im.format
            im.draft(None, (im.width // factor, im.height // factor))  # JPEG only: a smaller decode, at least this
            draft = next(d for d in (1, 2, 4, 8) if -(-stored_w // d) == im.width)
            shown = ImageOps.exif_transpose(im)
            shown.load()
        except (OSError, SyntaxError, EOFError, struct.error) as e:  # PIL's errors for truncated or damaged data
            raise ValueError(f"--edit={path}: the image is damaged ({type(e).__name__}: {e})") from e
    bits = pixel_bits(shown.mode, fmt)
    if bits is None:  # e.g. a TIFF's I: 32-bit integers
        raise ValueError(f"--edit={path}: mode {shown.mode} (32-bit integer or float pixels, of no agreed range): "
                         "save it as an 8- or 16-bit PNG or a JPEG")
    sixteen = bits == 16  # I;16, I;16B, ..., or I (how Pillow reads some 16-bit PNGs and PGMs)
    if shown.mode not in ("RGB", "L", "I"):
        shown = shown.convert("I" if sixteen else "RGB")
    factor = max(1, min(shown.size) // (EDIT_REDUCE_TO * reso))
    if factor > 1:
        shown = shown.reduce(factor)
    cells = (_reduced_cells(H, draft, rev_y, factor), _reduced_cells(W, draft, rev_x, factor))
    if (cells[0][-1] + 1, cells[1][-1] + 1) != (shown.height, shown.width):  # the cells' rule does not fit PIL's
        raise RuntimeError(f"--edit={path}: reduced to {shown.size}, cells {cells[1][-1] + 1}x{cells[0][-1] + 1}")
    if sixteen:
        img_3HW = torch.from_numpy(np.asarray(shown, dtype=np.float32) / 65535).clamp(0, 1).expand(3, -1, -1)
    else:
        img_3HW = torch.from_numpy(np.array(shown.convert("RGB"))).permute(2, 0, 1).float().div(255)
    return img_3HW, (H, W), cells


def _over_black(image: Image.Image) -> Image.Image:
    """A mask with transparency composited over black: a transparent pixel is not regenerated, whatever colour its
    RGB holds (editors often leave white there)."""
    if image.mode not in ("RGBA", "LA", "PA") and "transparency" not in image.info:
        return image
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)


def read_edit_inputs(image_path: str | Path, reso: int, mask_path: str | Path | None = None,
                     box: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The image and its mask as read (`read_edit_image`: reduced for a model of `reso` pixels), before the resize
    and crop to the model's size -> ((3, h, w) float in [0, 1], (h, w) bool, True = regenerate). The box and the
    mask are in the pixels of the image as displayed (EXIF orientation applied), at its full size. Every check that
    needs no model: readable files, the mask's size, the box inside the image, a mask that marks something (the
    reduction never shrinks it)."""
    if (mask_path is None) == (box is None):
        raise ValueError("--edit needs exactly one of --mask MASK.png or --box x0,y0,x1,y1")
    image_path = Path(image_path)
    if not image_path.is_file():
        raise FileNotFoundError(f"--edit={image_path}: no such file")
    img_3hw, (H, W), cells = read_edit_image(image_path, reso)
    if box is not None:
        check_box(H, W, box)
        (x0, y0, x1, y1), (rows, cols) = box, cells
        mask_hw = torch.zeros(rows[-1] + 1, cols[-1] + 1, dtype=torch.bool)
        mask_hw[rows[y0]:rows[y1 - 1] + 1, cols[x0]:cols[x1 - 1] + 1] = True  # the cells its pixels went into
    else:
        if not Path(mask_path).is_file():
            raise FileNotFoundError(f"--mask={mask_path}: no such file")
        with open_image(mask_path, "--mask") as m:
            mask_HW = np.asarray(_over_black(ImageOps.exif_transpose(m)).convert("L")) > 0
        if mask_HW.shape != (H, W):
            raise ValueError(f"--mask={mask_path} is {mask_HW.shape[1]}x{mask_HW.shape[0]} px, --edit={image_path} "
                             f"is {W}x{H} px: the mask must have the image's size")
        mask_hw = _any_pool(mask_HW, cells)
    if not mask_hw.any():
        raise ValueError("the mask covers no pixel of the image (black everywhere): nothing to regenerate")
    return img_3hw, mask_hw


def load_edit_inputs(image_path: str | Path, reso: int, mask_path: str | Path | None = None,
                     box: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> image (1, 3, reso, reso) in [0, 1] and mask (1, 1, reso, reso) bool (True = regenerate), as
    `read_edit_inputs` reads them, resized and center-cropped to the model's size."""
    img_3hw, mask_hw = read_edit_inputs(image_path, reso, mask_path, box)
    img_13HW = _image_to_model_size(img_3hw, reso)[None]
    mask_11HW = _mask_to_model_size(mask_hw, reso)
    if not mask_11HW.any():
        raise ValueError(f"the mask covers no pixel of the (resized, center-cropped) image the model sees at {reso} "
                         "px: it lies outside the centre square of the image, which is all the model edits")
    return img_13HW, mask_11HW


# ---------------------------------------------------------------------------------------------------------------------
# Image output
# ---------------------------------------------------------------------------------------------------------------------
def to_uint8_BHW3(img_B3HW: torch.Tensor) -> np.ndarray:
    """Images in [0, 1], (B, 3, H, W), any float dtype -> uint8 (B, H, W, 3) on the CPU (round to nearest)."""
    return img_B3HW.float().clamp(0, 1).mul(255).add_(0.5).floor_().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


# the formats a grid is written in, which keep it as drawn (ICO would shrink it to an icon, GIF reduce its colours),
# and the longest side their encoders take (None: no limit below memory)
GRID_FORMATS = {"PNG": None, "JPEG": 65_500, "WEBP": 16_383, "TIFF": None, "BMP": None}
GRID_PADDING = 2  # pixels around and between a grid's images


def image_format(path: Path) -> str | None:
    """The PIL format the suffix of `path` names (".jpg" -> "JPEG"), or None."""
    return Image.registered_extensions().get(Path(path).suffix.lower())


def is_image_file(path: Path) -> bool:
    """True when `path` ends in an image format PIL can write (.png, .jpg, .webp, ...), else it names a folder."""
    fmt = image_format(path)
    return fmt is not None and fmt in Image.SAVE


def grid_format_problem(path: Path) -> str | None:
    """Why the image file `path` cannot take a grid (a format not in GRID_FORMATS), or None."""
    fmt = image_format(path)
    if fmt in GRID_FORMATS:
        return None
    return (f"{path}: a grid is written as PNG, JPEG, WebP, TIFF or BMP (.png, .jpg, .webp, .tif, .bmp), not {fmt}, "
            "which would not keep it as drawn")


def grid_size_problem(path: Path, rows: int, ncol: int, px: int) -> str | None:
    """Why a grid of `rows` x `ncol` images of `px` pixels (save_grid's layout) is too large for the format of
    `path` (WebP's 16,383 px, JPEG's 65,500), or None: checked before sampling, not found at the end."""
    height, width = (n * (px + GRID_PADDING) + GRID_PADDING for n in (rows, ncol))
    fmt = image_format(path)
    limit = GRID_FORMATS.get(fmt)
    if limit is None or max(height, width) <= limit:
        return None
    return (f"{path}: the grid would be {width}x{height} px ({rows} rows of {ncol} images of {px} px), over {fmt}'s "
            f"{limit} px: write a .png, fewer images per row or class, or a folder (an --out without an image "
            "suffix)")


def save_image(img_HW3: np.ndarray, path: Path) -> None:
    """Write a uint8 (H, W, 3) image atomically, in the format of the suffix: a kill leaves the old file or none,
    never a truncated one that a later reader would take for a result."""
    fmt = image_format(path)
    if fmt not in Image.SAVE:  # unknown, or a format PIL only reads (.psd)
        raise ValueError(f"{path}: no image format has the suffix {Path(path).suffix!r} (.png, .jpg, .webp, ...)")
    write_atomic(path, lambda f: Image.fromarray(img_HW3).save(f, format=fmt))


def save_grid(imgs_BHW3: np.ndarray, path: Path, ncol: int, padding: int = GRID_PADDING) -> Path:
    """Save uint8 images (B, H, W, 3) as one image (format from the suffix), `ncol` per row (row r = images
    r*ncol ... r*ncol+ncol-1)."""
    if imgs_BHW3.dtype != np.uint8 or imgs_BHW3.ndim != 4:
        raise ValueError(f"expected uint8 (B, H, W, 3) images, got {imgs_BHW3.dtype} {imgs_BHW3.shape}")
    t_B3HW = torch.from_numpy(imgs_BHW3).permute(0, 3, 1, 2)
    grid_3HW = torchvision.utils.make_grid(t_B3HW, nrow=ncol, padding=padding, pad_value=255)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid_3HW.permute(1, 2, 0).numpy(), path)
    return path


def save_folder(imgs_BHW3: np.ndarray, folder: Path, names: Sequence[str]) -> Path:
    """Save each image as `folder/{name}.png`."""
    if len(names) != len(imgs_BHW3):
        raise ValueError(f"{len(names)} names for {len(imgs_BHW3)} images")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for img, name in zip(imgs_BHW3, names, strict=True):
        save_image(img, folder / f"{name}.png")
    return folder


# ---------------------------------------------------------------------------------------------------------------------
# Finite weights and images
# ---------------------------------------------------------------------------------------------------------------------
class NonFiniteValueError(RuntimeError):
    """Weights or outputs that hold NaN or Inf; the message names them."""


def nonfinite_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the floating-point tensors that hold any NaN or Inf."""
    return [name for name, t in named if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def nonfinite_weights_problem(named: Iterable[tuple[str, torch.Tensor]], what: str) -> str | None:
    """What is wrong with weights (of `what`) that hold NaN/Inf, naming the tensors; None when all are finite."""
    bad = nonfinite_tensors(named)
    if not bad:
        return None
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    return f"{what} has non-finite weights (NaN/Inf) in {bad[:5]}{more}: the file is damaged or comes from a run " \
           "that diverged"


def check_finite_weights(module: nn.Module, what: str) -> None:
    """NonFiniteValueError naming the parameters and buffers of `module` (described by `what`) that hold NaN/Inf."""
    if problem := nonfinite_weights_problem(module.state_dict().items(), what):
        raise NonFiniteValueError(problem)


def check_finite_images(img: torch.Tensor, where: str) -> None:
    """One reduction and one host sync per batch: NonFiniteValueError counting the NaN and Inf values of `img`."""
    if bool(torch.isfinite(img).all()):
        return
    n_nan, n_inf = int(torch.isnan(img).sum()), int(torch.isinf(img).sum())
    raise NonFiniteValueError(f"{where} produced non-finite pixels ({n_nan} NaN, {n_inf} Inf of {img.numel()} "
                              "values); no image of this batch was written")
