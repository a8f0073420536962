"""FID, Inception Score and precision/recall of generated images against an ADM-format reference batch.

The library behind `scripts/fid.py` (which only parses flags): `evaluate(sample, ref, ...)`.
`sample`: an `.npz` whose `arr_0` is uint8 (N, H, W, 3), or a folder of PNG/JPEG files.
`ref`: OpenAI's reference batch (`mu`, `sigma`, and `arr_0` images for precision/recall), or any npz with
`mu`/`sigma` only (then no precision/recall), or with images `arr_0` only (statistics computed here).
Every input is checked (`check_sample`, `load_reference`) before any feature is computed: object or float
arrays, statistics of another width and unreadable images are errors naming the file and what was expected.
Metrics follow OpenAI's guided-diffusion evaluator: FID from pool3 statistics, IS over consecutive splits of 5000
in the npz's row order (a folder's images, which have no order of their own, in `npz_order`, the row order of
sample.py's dump: a class-ordered listing would deflate the score) with the classifier's bias dropped (only with an
Inception port that has the classifier, see utils/evaluation/inception.py), improved precision/recall (Kynkaanniemi
et al. 2019) with k=3 and every radius kept (no outlier clamp). Differences: the k-NN distances are computed in fp32
(OpenAI's in fp16, which moved one of four precision splits by 0.006 in a review's check); sFID (the spatial
features `mu_s`/`sigma_s`) is not computed. Features come from a TorchScript port of the TF graph, so numbers can
differ from the TF evaluator in the second decimal.
"""
import logging
import math
import zipfile
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image

from utils.evaluation.inception import FEATURE_DIM, load_inception

logger = logging.getLogger(__name__)
IMAGE_EXTS = (".png", ".jpg", ".jpeg")


# ---------------------------------------------------------------------------------------------------------------
# Metrics on features
# ---------------------------------------------------------------------------------------------------------------
def feature_stats(feats_ND: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) in float64."""
    feats_ND = np.asarray(feats_ND, dtype=np.float64)
    if feats_ND.ndim != 2 or feats_ND.shape[0] < 2:
        raise ValueError(f"need (N >= 2, D) features, got {feats_ND.shape}")
    return feats_ND.mean(axis=0), np.cov(feats_ND, rowvar=False)


def _psd_factor(sigma_DD: np.ndarray) -> np.ndarray:
    """R with sigma = R^T R (negative eigenvalues, rounding, clipped to 0)."""
    w, V = np.linalg.eigh((sigma_DD + sigma_DD.T) / 2)
    return np.sqrt(np.clip(w, 0, None))[:, None] * V.T


NEGATIVE_FID_TOLERANCE = 1e-6  # of tr(S1) + tr(S2): rounding stays far below it; a more negative FID is an error


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), in float64.

    With S1 = R1^T R1 and S2 = R2^T R2, S1 S2 has the spectrum of (R1 R2^T)(R1 R2^T)^T, so tr((S1 S2)^(1/2)) is the
    sum of the singular values of R1 R2^T: no complex square roots (scipy.linalg.sqrtm's failure mode), and no
    squared condition number, so a set against itself scores 0 to rounding even with singular covariances. A
    distance below -NEGATIVE_FID_TOLERANCE x (tr S1 + tr S2) is a ValueError: the inputs were not covariances.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    tr_covmean = np.linalg.svd(_psd_factor(sigma1) @ _psd_factor(sigma2).T, compute_uv=False).sum()
    diff = mu1 - mu2
    traces = np.trace(sigma1) + np.trace(sigma2)
    fid = float(diff @ diff + traces - 2 * tr_covmean)
    if fid < -NEGATIVE_FID_TOLERANCE * abs(traces):
        raise ValueError(f"Frechet distance {fid:.6g} < 0: a covariance is not positive semi-definite (a reference "
                         f"npz's sigma of other statistics?)")
    return fid


def frechet_distance_of_features(a_ND: np.ndarray, b_MD: np.ndarray) -> float:
    """`frechet_distance` of two feature sets' Gaussians (unbiased covariances), exact either way it is computed.

    Sets smaller than the feature width (N - 1 + M - 1 < D: the study's few hundred images against Inception's 2048
    features) go through the (N, M) cross-Gram: with A = (a - mean) / sqrt(N - 1) and B likewise, S1 = A^T A and
    S2 = B^T B, so tr((S1 S2)^(1/2)) is the sum of the singular values of A B^T and tr(S1) = ||A||^2. No D x D
    matrix is formed (4 s -> 0.04 s for 10 x 500 sets at D = 2048, one thread). Larger sets use the covariances.
    """
    a_ND, b_MD = np.asarray(a_ND, np.float64), np.asarray(b_MD, np.float64)
    if a_ND.ndim != 2 or b_MD.ndim != 2 or a_ND.shape[1] != b_MD.shape[1] or min(len(a_ND), len(b_MD)) < 2:
        raise ValueError(f"need two (N >= 2, D) feature sets of one width, got {a_ND.shape} and {b_MD.shape}")
    if len(a_ND) + len(b_MD) - 2 >= a_ND.shape[1]:
        return frechet_distance(*feature_stats(a_ND), *feature_stats(b_MD))
    mu_a, mu_b = a_ND.mean(axis=0), b_MD.mean(axis=0)
    A_ND, B_MD = (a_ND - mu_a) / math.sqrt(len(a_ND) - 1), (b_MD - mu_b) / math.sqrt(len(b_MD) - 1)
    tr_covmean = np.linalg.svd(A_ND @ B_MD.T, compute_uv=False).sum()
    diff = mu_a - mu_b
    return float(diff @ diff + (A_ND * A_ND).sum() + (B_MD * B_MD).sum() - 2 * tr_covmean)


def inception_score(probs_NK: np.ndarray, split_size: int = 5000) -> float:
    """exp(E[KL(p(y|x) || p(y))]) per split of `split_size` consecutive samples, averaged over splits (as OpenAI's
    evaluator). The rows are taken in their order: splits of a class-ordered input would each see a few classes
    only, and score far lower, so permute such an input first (`npz_order`)."""
    probs_NK = np.asarray(probs_NK, dtype=np.float64)
    scores = []
    for start in range(0, len(probs_NK), split_size):
        part = probs_NK[start:start + split_size]
        marginal = part.mean(axis=0, keepdims=True)
        safe = np.where(part > 0, part, 1.0)  # 0 * log 0 = 0
        kl = (part * (np.log(safe) - np.log(np.where(marginal > 0, marginal, 1.0)))).sum(axis=1).mean()
        scores.append(math.exp(kl))
    return float(np.mean(scores))


NPZ_ORDER_SEED = 0


def npz_order(total: int) -> np.ndarray:
    """A fixed permutation of [0, total): the row order of sample.py's FID npz (row j is PNG npz_order(N)[j]; see
    utils.evaluation.fid_dump), and the order the Inception Score reads a folder's images in, so that a dump's
    folder and its npz score alike and the class-major PNGs are mixed within every split."""
    return np.random.default_rng(NPZ_ORDER_SEED).permutation(total)


def _sq_dists(a_ND: torch.Tensor, b_MD: torch.Tensor) -> torch.Tensor:
    d = a_ND.pow(2).sum(1, keepdim=True) - 2 * a_ND @ b_MD.T + b_MD.pow(2).sum(1)[None]
    return d.clamp_(min=0)


def manifold_radii(feats_ND: np.ndarray, k: int = 3, drop_top_percent: float | None = None,
                   device: str = "cpu", batch: int = 10000) -> torch.Tensor:
    """Squared distance of each point to its k-th nearest other point. With `drop_top_percent`, the radii above the
    (100 - drop_top_percent) percentile are set to 0 (those points then cover nothing; OpenAI's evaluator's
    clamp_to_percentile=95 is drop_top_percent=5, and it clamps none by default)."""
    x = torch.as_tensor(feats_ND, dtype=torch.float32, device=device)
    if len(x) <= k:
        raise ValueError(f"need more than k={k} points for the k-NN radii, got {len(x)}")
    radii = torch.cat([_sq_dists(x[i:i + batch], x).kthvalue(k + 1, dim=1).values  # +1: the point itself
                       for i in range(0, len(x), batch)])
    if drop_top_percent is not None:
        limit = torch.quantile(radii.double(), 1 - drop_top_percent / 100).float()
        radii[radii > limit] = 0
    return radii


def _coverage(points_ND: torch.Tensor, centers_MD: torch.Tensor, radii_M: torch.Tensor, batch: int) -> float:
    inside = [(_sq_dists(points_ND[i:i + batch], centers_MD) <= radii_M[None]).any(dim=1)
              for i in range(0, len(points_ND), batch)]
    return torch.cat(inside).double().mean().item()


def precision_recall(ref_feats: np.ndarray, sample_feats: np.ndarray, k: int = 3,
                     drop_top_percent: float | None = None, device: str = "cpu",
                     batch: int = 10000) -> tuple[float, float]:
    """Precision: share of samples inside the reference manifold; recall: share of references inside the
    sample manifold (manifold = union of k-NN balls)."""
    ref = torch.as_tensor(ref_feats, dtype=torch.float32, device=device)
    smp = torch.as_tensor(sample_feats, dtype=torch.float32, device=device)
    ref_radii = manifold_radii(ref_feats, k, drop_top_percent, device, batch)
    smp_radii = manifold_radii(sample_feats, k, drop_top_percent, device, batch)
    return _coverage(smp, ref, ref_radii, batch), _coverage(ref, smp, smp_radii, batch)


# ---------------------------------------------------------------------------------------------------------------
# Inputs, checked before any feature is computed
# ---------------------------------------------------------------------------------------------------------------
IMAGE_MODES = ("1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LA", "PA")  # 8-bit modes that convert to RGB


def read_npz_header(npz_path: Path, key: str = "arr_0") -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one array in an `.npz`, read from its header only (no data loaded)."""
    with zipfile.ZipFile(npz_path) as zf, zf.open(f"{key}.npy") as f:
        shape, _, dtype = _read_npy_header(f)
    return tuple(shape), np.dtype(dtype)


def _read_npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    major, _ = np.lib.format.read_magic(f)
    read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    return read_header(f)


def open_npz_array(npz_path: Path, key: str = "arr_0") -> np.ndarray:
    """One array of an `.npz`, memory-mapped when stored uncompressed (np.savez, `pack_npz`), else loaded."""
    with zipfile.ZipFile(npz_path) as zf:
        info = zf.getinfo(f"{key}.npy")
        if info.compress_type != zipfile.ZIP_STORED:
            logger.warning("%s: `%s` is compressed, so it is read into memory whole (%.1f GB); np.savez (sample.py's "
                           "dump) writes it memory-mappable", npz_path, key, info.file_size / 1e9)
            return np.load(npz_path)[key]
        with open(npz_path, "rb") as raw:  # the member's data starts after its local file header
            raw.seek(info.header_offset)
            local = raw.read(30)
            name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
            start = info.header_offset + 30 + name_len + extra_len
        with zf.open(info) as f:
            shape, fortran, dtype = _read_npy_header(f)
            header_len = f.tell()
    return np.memmap(npz_path, dtype=dtype, mode="r", offset=start + header_len, shape=shape,
                     order="F" if fortran else "C")


def _npz_keys(path: Path) -> list[str]:
    """Array names of an npz; a file that is not one is a ValueError naming it."""
    try:
        with zipfile.ZipFile(path) as zf:
            return [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
    except (zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"{path}: not a readable .npz file ({e})") from e


def check_images_npz(path: Path, key: str = "arr_0") -> int:
    """Number of images in `path`'s `key`, after checking from its header that it is uint8 (N >= 2, H, W, 3)."""
    try:
        shape, dtype = read_npz_header(path, key)
    except (KeyError, ValueError, OSError) as e:
        raise ValueError(f"{path}: cannot read the header of `{key}` ({e})") from e
    if dtype.hasobject:
        raise ValueError(f"{path}: `{key}` is an object array ({dtype}); expected uint8 images (N, H, W, 3) "
                         f"(object arrays are refused: they hold pickled Python objects, not pixels)")
    if dtype != np.uint8:
        raise ValueError(f"{path}: `{key}` is {dtype}; expected uint8 images (N, H, W, 3) in [0, 255] "
                         f"(float images must be scaled and converted first)")
    if len(shape) != 4 or shape[-1] != 3 or shape[0] < 2:
        raise ValueError(f"{path}: `{key}` has shape {shape}; expected uint8 (N >= 2, H, W, 3)")
    return shape[0]


def listing_order(path: Path) -> tuple[int, int, str]:
    """Sort key of a folder's images: numbered names (sample.py's `{idx:06d}.png`, 7 digits past 999,999) by
    number, before any other name, which sort by name. The dump's index order is the one `npz_order` permutes."""
    return (0, int(path.stem), path.name) if path.stem.isdigit() else (1, 0, path.name)


def image_files(folder: Path) -> list[Path]:
    """The images of `folder` (not hidden files: macOS's `._x.png`) in `listing_order`, each checked first (header
    and integrity, not decoded): unreadable or truncated files, 16-bit or float images and mixed sizes are errors
    naming the file."""
    files = sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")),
                   key=listing_order)
    if len(files) < 2:
        raise FileNotFoundError(f"{folder}: expected at least 2 {'/'.join(IMAGE_EXTS)} files, found {len(files)}")
    size = None
    for p in files:
        try:
            with Image.open(p) as im:
                mode, im_size = im.mode, im.size
                im.verify()  # the whole file (PNG: every chunk and its CRC) without decoding pixels
        except (OSError, SyntaxError, ValueError) as e:
            raise ValueError(f"{p}: not a readable image ({e})") from e
        if mode not in IMAGE_MODES:
            raise ValueError(f"{p}: image mode {mode!r}; expected 8-bit images (RGB, RGBA, L or P)")
        if size is not None and im_size != size:
            raise ValueError(f"{p}: size {im_size}, but {files[0].name} is {size}; expected one size for all")
        size = im_size
    return files


def _read_rgb(p: Path) -> np.ndarray:
    try:
        with Image.open(p) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as e:  # truncated data shows only when decoding
        raise ValueError(f"{p}: not a readable image ({e})") from e


def image_batches(source: Path, batch_size: int) -> tuple[int, tuple[int, int], Iterator[np.ndarray]]:
    """(count, (H, W), iterator of uint8 (b, H, W, 3) batches) for an npz (`arr_0`) or a folder of images, checked
    first."""
    source = Path(source)
    if source.is_dir():
        files = image_files(source)
        with Image.open(files[0]) as im:
            hw = (im.height, im.width)
        return len(files), hw, (np.stack([_read_rgb(p) for p in files[i:i + batch_size]])
                                for i in range(0, len(files), batch_size))
    if "arr_0" not in _npz_keys(source):
        raise ValueError(f"{source}: no `arr_0`; expected uint8 images (N, H, W, 3) in `arr_0`")
    n = check_images_npz(source)
    arr = open_npz_array(source, "arr_0")
    return n, arr.shape[1:3], (np.ascontiguousarray(arr[i:i + batch_size]) for i in range(0, n, batch_size))


def load_reference(path: Path) -> dict[str, np.ndarray]:
    """Keys present among `mu` (D,), `sigma` (D, D) (float64, D = the Inception width) and `arr_0` (memory-mapped
    uint8 images) of a reference npz, each checked."""
    path = Path(path)
    keys = set(_npz_keys(path))
    out = {}
    for k in ("mu", "sigma"):
        if k in keys:
            shape, dtype = read_npz_header(path, k)
            if dtype.kind not in "fiu":
                raise ValueError(f"{path}: `{k}` is {dtype}; expected float statistics")
            with np.load(path, allow_pickle=False) as f:
                out[k] = f[k].astype(np.float64)
    if ("mu" in out) != ("sigma" in out):
        raise ValueError(f"{path}: has only one of mu/sigma; expected both (pool3 statistics) or neither")
    if "mu" in out:
        D = FEATURE_DIM
        if out["mu"].shape != (D,) or out["sigma"].shape != (D, D):
            raise ValueError(f"{path}: mu {out['mu'].shape} and sigma {out['sigma'].shape}; expected ({D},) and "
                             f"({D}, {D}), the Inception pool3 width")
        if not (np.isfinite(out["mu"]).all() and np.isfinite(out["sigma"]).all()):
            raise ValueError(f"{path}: mu/sigma hold NaN or Inf; expected finite statistics")
        sigma = out["sigma"]
        if (np.diag(sigma) < 0).any() or np.abs(sigma - sigma.T).max() > 1e-6 * np.abs(sigma).max():
            raise ValueError(f"{path}: sigma is not a covariance (not symmetric, or a negative variance on its "
                             f"diagonal); expected the pool3 features' covariance")
    if "arr_0" in keys:
        check_images_npz(path)
        out["arr_0"] = open_npz_array(path, "arr_0")
    if not out:
        raise ValueError(f"{path}: expected `mu` and `sigma` and/or images `arr_0`, found {sorted(keys)}")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------
MIN_FID_IMAGES = 2048  # the pool3 width: with fewer images the covariance is singular and FID biased upward


def check_comparison(sample: Path, n: int, hw: tuple[int, int], ref: Path, reference: dict[str, np.ndarray],
                     k: int, with_pr: bool) -> bool:
    """Warn where the numbers would mislead (too few images, two resolutions, no reference images for precision/
    recall); a `k` the image counts cannot serve is a ValueError -> whether precision/recall can be computed."""
    ref_images = reference.get("arr_0")
    if with_pr and ref_images is None:
        logger.warning("precision/recall skipped: %s holds mu/sigma only, no reference images (arr_0)", ref)
        with_pr = False
    if with_pr and not 1 <= k < min(n, len(ref_images)):
        raise ValueError(f"k={k}: precision/recall need 1 <= k < the smaller image count ({n} in {sample}, "
                         f"{len(ref_images)} in {ref})")
    counts = {sample: n} | ({ref: len(ref_images)} if ref_images is not None and "mu" not in reference else {})
    for path, count in counts.items():  # one warning for a file given as both
        if count < MIN_FID_IMAGES:
            logger.warning("%s holds %d images, fewer than %d (the Inception feature width): its FID is biased upward "
                           "and comparable only with FIDs of as many images (the paper's: 50,000)", path, count,
                           MIN_FID_IMAGES)
    if ref_images is not None and tuple(ref_images.shape[1:3]) != tuple(hw):
        logger.warning("the sample images are %dx%d, the reference images %dx%d: a FID across resolutions measures "
                       "the resizing too (the paper compares 256x256 with VIRTUAL_imagenet256_labeled.npz)", *hw,
                       *ref_images.shape[1:3])
    return with_pr


def finite_features(feats_ND: np.ndarray, net_path: Path, what: str) -> np.ndarray:
    """`feats_ND`, or a ValueError naming the network when a feature is NaN or Inf (no score comes of them)."""
    if not np.isfinite(feats_ND).all():
        raise ValueError(f"{net_path} gave non-finite features for the {what} images: is it an Inception port?")
    return feats_ND


def evaluate(sample: Path, ref: Path, inception_path: str | None, batch_size: int, device: str,
             k: int = 3, with_pr: bool = True) -> dict[str, Any]:
    """FID, IS (when the Inception port has its classifier) and precision/recall of `sample` against `ref`, with
    what they were computed from (the inputs, the Inception file, k)."""
    reference = load_reference(ref)  # validate both inputs before the slow parts
    n, hw, batches = image_batches(sample, batch_size)
    with_pr = check_comparison(sample, n, hw, ref, reference, k, with_pr)
    net = load_inception(inception_path, device)
    logger.info("features of %d sample images", n)
    feats, probs = net.extract(batches)
    feats = finite_features(feats, net.path, "sample")
    results: dict[str, Any] = {"sample": str(sample), "ref": str(ref), "inception": str(net.path), "num_samples": n}
    ref_feats = None
    if "arr_0" in reference and (with_pr or "mu" not in reference):
        logger.info("features of %d reference images", len(reference["arr_0"]))
        ref_feats, _ = net.extract(np.ascontiguousarray(reference["arr_0"][i:i + batch_size])
                                   for i in range(0, len(reference["arr_0"]), batch_size))
        ref_feats = finite_features(ref_feats, net.path, "reference")
    mu_ref, sigma_ref = (reference["mu"], reference["sigma"]) if "mu" in reference else feature_stats(ref_feats)
    results["fid"] = frechet_distance(*feature_stats(feats), mu_ref, sigma_ref)
    if probs is not None:  # an npz in its row order, as OpenAI's evaluator; a folder in the dump's npz order
        results["inception_score"] = inception_score(probs[npz_order(n)] if Path(sample).is_dir() else probs)
    else:
        logger.warning("Inception Score skipped: %s has no classifier layer (use inception-2015-12-05.pt)", net.path)
    if with_pr and ref_feats is not None:
        results["precision"], results["recall"] = precision_recall(ref_feats, feats, k=k, device=device)
        results["k"] = k
    return results
