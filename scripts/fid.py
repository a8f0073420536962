"""FID, Inception Score and precision/recall of generated images against an ADM-format reference batch.

    python scripts/fid.py --sample samples/d16-cfg1.5-topk900-topp0.96-seed0-n50.npz \
        --ref VIRTUAL_imagenet256_labeled.npz [--inception /path/to/inception-2015-12-05.pt]

`--sample`: an `.npz` whose `arr_0` is uint8 (N, H, W, 3), or a folder of PNG/JPEG files.
`--ref`: OpenAI's reference batch (`mu`, `sigma`, and `arr_0` images for precision/recall), or any npz with
`mu`/`sigma` only (then no precision/recall), or with images `arr_0` only (statistics computed here).
Metrics follow OpenAI's guided-diffusion evaluator: FID from pool3 statistics, IS over splits of 5000 with the
classifier's bias dropped (only with an Inception port that has the classifier, see utils/inception.py),
improved precision/recall (Kynkaanniemi et al. 2019) with k=3 and radii above the 95th percentile dropped.
Features come from a TorchScript port of the TF graph, so numbers can differ from the TF evaluator in the
second decimal.
"""
import argparse
import json
import logging
import math
import sys
from pathlib import Path
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python scripts/fid.py` from anywhere
from utils.fid_dump import open_npz_array  # noqa: E402
from utils.inception import load_inception  # noqa: E402

logger = logging.getLogger("fid")
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


def _psd_sqrt(sigma_DD: np.ndarray) -> np.ndarray:
    w, V = np.linalg.eigh((sigma_DD + sigma_DD.T) / 2)
    return (V * np.sqrt(np.clip(w, 0, None))) @ V.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), in float64.

    tr((S1 S2)^(1/2)) = sum of sqrt(eigenvalues of S1^(1/2) S2 S1^(1/2)), a symmetric PSD matrix with the same
    spectrum as S1 S2: no complex square roots (scipy.linalg.sqrtm's failure mode) and no eps retry needed.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def inception_score(probs_NK: np.ndarray, split_size: int = 5000) -> float:
    """exp(E[KL(p(y|x) || p(y))]) per split of `split_size` samples, averaged over splits (as OpenAI's evaluator)."""
    probs_NK = np.asarray(probs_NK, dtype=np.float64)
    scores = []
    for start in range(0, len(probs_NK), split_size):
        part = probs_NK[start:start + split_size]
        marginal = part.mean(axis=0, keepdims=True)
        safe = np.where(part > 0, part, 1.0)  # 0 * log 0 = 0
        kl = (part * (np.log(safe) - np.log(np.where(marginal > 0, marginal, 1.0)))).sum(axis=1).mean()
        scores.append(math.exp(kl))
    return float(np.mean(scores))


def _sq_dists(a_ND: torch.Tensor, b_MD: torch.Tensor) -> torch.Tensor:
    d = a_ND.pow(2).sum(1, keepdim=True) - 2 * a_ND @ b_MD.T + b_MD.pow(2).sum(1)[None]
    return d.clamp_(min=0)


def manifold_radii(feats_ND: np.ndarray, k: int = 3, clamp_percentile: float | None = 5.0,
                   device: str = "cpu", batch: int = 10000) -> torch.Tensor:
    """Squared distance of each point to its k-th nearest other point; radii above the (100 - clamp)
    percentile are set to 0 (those points then cover nothing), as in OpenAI's evaluator."""
    x = torch.as_tensor(feats_ND, dtype=torch.float32, device=device)
    if len(x) <= k:
        raise ValueError(f"need more than k={k} points for the k-NN radii, got {len(x)}")
    radii = torch.cat([_sq_dists(x[i:i + batch], x).kthvalue(k + 1, dim=1).values  # +1: the point itself
                       for i in range(0, len(x), batch)])
    if clamp_percentile is not None:
        limit = torch.quantile(radii.double(), 1 - clamp_percentile / 100).float()
        radii[radii > limit] = 0
    return radii


def _coverage(points_ND: torch.Tensor, centers_MD: torch.Tensor, radii_M: torch.Tensor, batch: int) -> float:
    inside = [(_sq_dists(points_ND[i:i + batch], centers_MD) <= radii_M[None]).any(dim=1)
              for i in range(0, len(points_ND), batch)]
    return torch.cat(inside).float().mean().item()


def precision_recall(ref_feats: np.ndarray, sample_feats: np.ndarray, k: int = 3,
                     clamp_percentile: float | None = 5.0, device: str = "cpu",
                     batch: int = 10000) -> tuple[float, float]:
    """Precision: share of samples inside the reference manifold; recall: share of references inside the
    sample manifold (manifold = union of k-NN balls)."""
    ref = torch.as_tensor(ref_feats, dtype=torch.float32, device=device)
    smp = torch.as_tensor(sample_feats, dtype=torch.float32, device=device)
    ref_radii = manifold_radii(ref_feats, k, clamp_percentile, device, batch)
    smp_radii = manifold_radii(sample_feats, k, clamp_percentile, device, batch)
    return _coverage(smp, ref, ref_radii, batch), _coverage(ref, smp, smp_radii, batch)


# ---------------------------------------------------------------------------------------------------------------
# Image sources
# ---------------------------------------------------------------------------------------------------------------
def image_batches(source: Path, batch_size: int) -> tuple[int, Iterator[np.ndarray]]:
    """(count, iterator of uint8 (b, H, W, 3) batches) for an npz (`arr_0`) or a folder of images."""
    source = Path(source)
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_EXTS)
        if not files:
            raise FileNotFoundError(f"{source}: no {'/'.join(IMAGE_EXTS)} files")

        def read(p: Path) -> np.ndarray:
            with Image.open(p) as im:
                return np.asarray(im.convert("RGB"))

        return len(files), (np.stack([read(p) for p in files[i:i + batch_size]])
                            for i in range(0, len(files), batch_size))
    arr = open_npz_array(source, "arr_0")
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"{source}: arr_0 must be uint8 (N, H, W, 3), got {arr.dtype} {arr.shape}")
    return len(arr), (np.ascontiguousarray(arr[i:i + batch_size]) for i in range(0, len(arr), batch_size))


def load_reference(path: Path) -> dict[str, np.ndarray]:
    """Keys present among `mu`, `sigma` (float64) and `arr_0` (memory-mapped images) of a reference npz."""
    with np.load(path) as f:
        keys = set(f.files)
        out = {k: f[k].astype(np.float64) for k in ("mu", "sigma") if k in keys}
    if ("mu" in out) != ("sigma" in out):
        raise ValueError(f"{path}: has only one of mu/sigma")
    if "arr_0" in keys:
        out["arr_0"] = open_npz_array(path, "arr_0")
    if not out:
        raise ValueError(f"{path}: expected `mu` and `sigma` and/or images `arr_0`, found {sorted(keys)}")
    return out


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------
def evaluate(sample: Path, ref: Path, inception_path: str | None, batch_size: int, device: str,
             k: int = 3, with_pr: bool = True) -> dict[str, float]:
    reference = load_reference(ref)  # validate both inputs before the slow parts
    n, batches = image_batches(sample, batch_size)
    net = load_inception(inception_path, device)
    logger.info("features of %d sample images", n)
    feats, probs = net.extract(batches)
    results: dict[str, float] = {"num_samples": n}
    ref_feats = None
    if "arr_0" in reference and (with_pr or "mu" not in reference):
        logger.info("features of %d reference images", len(reference["arr_0"]))
        ref_feats, _ = net.extract(np.ascontiguousarray(reference["arr_0"][i:i + batch_size])
                                   for i in range(0, len(reference["arr_0"]), batch_size))
    mu_ref, sigma_ref = (reference["mu"], reference["sigma"]) if "mu" in reference else feature_stats(ref_feats)
    results["fid"] = frechet_distance(*feature_stats(feats), mu_ref, sigma_ref)
    if probs is not None:
        results["inception_score"] = inception_score(probs)
    else:
        logger.warning("Inception Score skipped: %s has no classifier layer (use inception-2015-12-05.pt)", net.path)
    if with_pr and ref_feats is not None:
        results["precision"], results["recall"] = precision_recall(ref_feats, feats, k=k, device=device)
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sample", required=True, help="npz with arr_0 uint8 (N,H,W,3), or a folder of images")
    parser.add_argument("--ref", required=True, help="reference npz (mu/sigma and/or arr_0), ADM format")
    parser.add_argument("--inception", default=None, help="Inception TorchScript file (see utils/inception.py)")
    parser.add_argument("--bs", type=int, default=100, help="images per Inception batch")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--k", type=int, default=3, help="neighbours for precision/recall")
    parser.add_argument("--no_pr", action="store_true", help="skip precision/recall (saves the reference pass)")
    parser.add_argument("--out", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    for flag in ("sample", "ref"):
        if not Path(getattr(args, flag)).exists():
            parser.error(f"--{flag}={getattr(args, flag)}: no such file or folder")
    if args.bs < 1:
        parser.error(f"--bs must be >= 1, got {args.bs}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    results = evaluate(Path(args.sample), Path(args.ref), args.inception, args.bs, args.device, args.k,
                       with_pr=not args.no_pr)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return results


if __name__ == "__main__":
    main()
