"""The views of an image that a token cache stores (scripts/extract_tokens.py): crops of VAR's resized image.

Every view starts as VAR's transforms do (utils.data.loaders.build_transforms): the shorter side resized to
round(mid_reso * reso) with LANCZOS. Then a reso x reso crop, optionally mirrored:
- "center": the centre crop (VAR's validation transform);
- "tl", "tr", "bl", "br": a corner (with "center", torchvision's FiveCrop);
- "rand<i>": VAR's RandomCrop drawn under `sample_seed(seed, i, index)`, keyed by the image's index (the training
  loader keys its draws by position in the shuffled epoch, so this is not the crop that image got in epoch i): the
  i-th random crop of each image, reproducible and independent of ranks;
- a "_flip" suffix mirrors the crop horizontally.
Presets: "tencrop" (LlamaGen's ten crops: the five crops, then the same five mirrored).
"""
import re

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, RandomCrop
from torchvision.transforms import functional as TF

from utils.data.loaders import normalize_01_into_pm1, sample_seed

CROPS = ("center", "tl", "tr", "bl", "br")
PRESETS = {"tencrop": [*CROPS, *(f"{c}_flip" for c in CROPS)]}
VIEW_RE = re.compile(r"^(center|tl|tr|bl|br|rand(?:0|[1-9]\d*))(_flip)?$")  # rand01 would repeat rand1's crop


def parse_views(spec: str) -> list[str]:
    """Comma-separated view names and presets -> the list of view names (ValueError naming a bad or repeated one)."""
    views = [v for name in spec.split(",") if name.strip() for v in PRESETS.get(name.strip(), [name.strip()])]
    bad = [v for v in views if not VIEW_RE.match(v)]
    if bad or not views:
        raise ValueError(f"--views={spec}: unknown view {bad[0] if bad else '(none)'}; expected names of "
                         f"{'/'.join(CROPS)}/rand<i>, each optionally with _flip, or a preset ({', '.join(PRESETS)})")
    repeated = sorted({v for v in views if views.count(v) > 1})
    if repeated:
        raise ValueError(f"--views={spec}: {repeated} repeated")
    return views


def crop_box(view: str, width: int, height: int, reso: int, seed: int, index: int) -> tuple[int, int]:
    """(top, left) of `view`'s reso x reso crop in a width x height image (item `index`, run seed `seed`)."""
    crop = view.removesuffix("_flip")
    if crop.startswith("rand"):
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(sample_seed(seed, int(crop[4:]), index))  # CUDA's untouched
            top, left, _, _ = RandomCrop.get_params(torch.empty(1, height, width), (reso, reso))
        return top, left
    if crop == "center":  # torchvision's CenterCrop rounding
        return int(round((height - reso) / 2.0)), int(round((width - reso) / 2.0))
    return (0 if crop[0] == "t" else height - reso), (0 if crop[1] == "l" else width - reso)


def render_views(img: Image.Image, views: list[str], reso: int, mid_reso: float, seed: int,
                 index: int) -> torch.Tensor:
    """The views of image `index` as a (K, 3, reso, reso) float tensor in [-1, 1]."""
    img = TF.resize(img, round(mid_reso * reso), interpolation=InterpolationMode.LANCZOS)
    out = []
    for view in views:
        top, left = crop_box(view, img.width, img.height, reso, seed, index)
        crop = TF.crop(img, top, left, reso, reso)
        out.append(normalize_01_into_pm1(TF.to_tensor(TF.hflip(crop) if view.endswith("_flip") else crop)))
    return torch.stack(out)
