"""Evaluation while training (train.py --eval_every): the Frechet distance of generated images to the validation
images, in the feature space of a named network, at points of a run.

`--eval_net inception` is FID (the Inception of utils.evaluation.inception; ImageNet); a path names a classifier
saved as a `SmallCNN` state dict (utils.evaluation.classifier; the study's `classifier.pt`): its pooled features
(FD_clf, for small data sets) and its predictions: class consistency, the share of images classified as the class
they were generated for. Each evaluation generates `--eval_n` images, class i % num_classes for image i, in
chunks of `CHUNK` seeded from (seed, chunk) alone: the same images for any number of ranks, over which the chunks
are sharded, and the same at every point of the curve apart from the weights. The reference is `--eval_n`
validation images of the same classes in the same proportions (`reference_indices`). Sampling uses its own
generators, so training draws what it would without it. A `stop` callback, asked before each chunk on every rank,
ends an evaluation early (utils.run.preemption.Stopped: train.py's signal, whose checkpoint leaves the evaluation
to the resumed run).
"""
import hashlib
import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

import dist
from utils.data.loaders import dataset_targets
from utils.evaluation.classifier import SmallCNN
from utils.evaluation.fid import frechet_distance_of_features
from utils.evaluation.fid_dump import chunk_seed
from utils.evaluation.inception import load_inception
from utils.evaluation.scores import classifier_view
from utils.flags import EVAL_NET_EXPECTED, FlagError
from utils.run.log import SAME_ON_ALL_RANKS
from utils.run.preemption import Stopped
from utils.sample_io import to_uint8_BHW3

logger = logging.getLogger(__name__)
CHUNK = 50  # images per generation call
FeatureFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]  # uint8 (N,H,W,3) -> (N, D), classes (N,)


def load_classifier_file(name: str) -> SmallCNN:
    """The SmallCNN of an --eval_net file; FlagError when it is not one (train.py checks it before any work)."""
    try:
        state = torch.load(name, map_location="cpu", weights_only=True)
        clf = SmallCNN(state["head.weight"].shape[0], ch=state["features.0.weight"].shape[0])
        clf.load_state_dict(state)
    except Exception as e:  # not a file, not a state dict, another network
        raise FlagError(f"--eval_net={name}: {EVAL_NET_EXPECTED}: {type(e).__name__}: {e}") from e
    return clf


def feature_network(name: str, device: torch.device) -> tuple[str, FeatureFn, str]:
    """(metric name, features and predicted classes of uint8 images, which network: its file's name, and the
    digest of a classifier's) for `--eval_net`: "inception" (no classes: its 1008 are not the data set's) or a
    SmallCNN state-dict file."""
    if name == "inception":
        net = load_inception(None, device=device, flag="--eval_net")
        return "fid", lambda imgs: (net.extract([imgs])[0], None), f"inception {Path(net.path).name}"
    clf = load_classifier_file(name)

    def features(imgs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        view = classifier_view(clf, imgs)
        return view.feats_ND, view.probs_NK.argmax(axis=1)
    digest = hashlib.sha256(Path(name).read_bytes()).hexdigest()[:12]
    return "fd_clf", features, f"{Path(name).name} sha256 {digest}"


def reference_indices(labels: Sequence[int] | None, n: int, num_classes: int) -> list[int]:
    """The validation images of the reference: for generated image i (class i % num_classes) the next image of that
    class in the data set's order, so that both sets hold the same classes in the same proportions (the first n
    images of a class-ordered ImageFolder, ImageNet's val/, would be its first n / 50 classes only). A class with
    too few images gives all it has; without labels, the first n images."""
    if labels is None:
        return list(range(n))
    of_class: dict[int, list[int]] = defaultdict(list)
    for i, c in enumerate(labels):
        of_class[c].append(i)
    wanted = ((i % num_classes, i // num_classes) for i in range(n))
    return [of_class[c][k] for c, k in wanted if k < len(of_class[c])]


def sharded_features(n: int, images: Callable[[int, int], np.ndarray], features: FeatureFn,
                     stop: Callable[[], bool] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Features (and predicted classes) of images 0..n-1 made in chunks of CHUNK (`images(start, stop)` -> uint8),
    chunk c on rank c % world; every rank runs the same number of calls (FSDP's collectives) and gets all of them
    in order. `stop()` (a collective, the same answer on every rank) before each of those calls: True raises
    Stopped."""
    world, rank = dist.get_world_size(), dist.get_rank()
    chunks = list(range(0, n, CHUNK))
    mine = {}
    for i in range(rank, len(chunks) + (-len(chunks)) % world, world):
        if stop is not None and stop():
            raise Stopped(f"stopped before chunk {i + 1} of {len(chunks)}")
        start = chunks[i % len(chunks)]  # ranks past the last chunk redo one and drop it
        feats = features(images(start, min(start + CHUNK, n)))
        if i < len(chunks):
            mine[start] = feats
    gathered = {k: v for part in dist.all_gather_object(mine) for k, v in part.items()}
    feats = np.concatenate([gathered[s][0] for s in chunks])
    return feats, None if gathered[0][1] is None else np.concatenate([gathered[s][1] for s in chunks])


@dataclass
class TrainingEval:
    """One curve: `evaluate` appends {"epoch", "images", "train_s", metric[, "consistency"], "tf32", "eval"} to
    `history` (saved in checkpoints); train_s is the training time so far (`Trainer.train_seconds`: no validation,
    evaluation or save); tf32: whether TF32 was on for the point's samples and features (train.py --tf32 on CUDA),
    which a resume may change; eval: the point's `settings` (a resume with others is logged: their points are not
    comparable, FD depending on the sample count above all)."""

    net: str
    n: int
    seed: int
    cfg: float = 1.5
    top_k: int = 900
    top_p: float = 0.96
    dtype: torch.dtype | None = None  # the samples' precision (None: fp32; train.inference_dtype)
    tf32: bool = False  # TF32 on (CUDA): recorded in each point
    history: list[dict] = field(default_factory=list)

    def __post_init__(self):
        self.metric: str | None = None
        self.features: FeatureFn | None = None
        self.ref_feats: np.ndarray | None = None
        self.net_id = self.net  # what `prepare` loaded: a file's name (and digest)

    @property
    def settings(self) -> dict:
        """What a point's score depends on besides the weights."""
        return dict(net=self.net_id, n=self.n, seed=self.seed, cfg=self.cfg, top_k=self.top_k, top_p=self.top_p,
                    dtype=str(self.dtype or torch.float32).removeprefix("torch."))

    def prepare(self, val_set: Dataset, num_classes: int, device: torch.device) -> None:
        """Load the feature network and the reference features (collective)."""
        labels = dataset_targets(val_set)
        ref = reference_indices(labels, min(self.n, len(val_set)) if labels is None else self.n, num_classes)
        if len(ref) < 2:
            raise ValueError(f"--eval_every needs validation images to compare with; the validation set has "
                             f"{len(ref)} of the model's classes")
        if len(ref) < self.n:
            logger.warning("the --eval_every reference holds %d validation images for %d generated ones (some classes "
                           "have fewer than %d): lower --eval_n for a like-for-like comparison", len(ref), self.n,
                           -(-self.n // num_classes), extra=SAME_ON_ALL_RANKS)

        def real(start: int, stop: int) -> np.ndarray:
            return to_uint8_BHW3((torch.stack([val_set[i][0] for i in ref[start:stop]]) + 1) / 2)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # a network's init draws
            self.metric, self.features, self.net_id = feature_network(self.net, device)
            self.ref_feats, _ = sharded_features(len(ref), real, self.features)

    @torch.no_grad()
    def evaluate(self, mvar: nn.Module, epoch: int, images_seen: int, train_seconds: float,
                 stop: Callable[[], bool] | None = None) -> dict:
        """Generate, featurize and score (collective); the point, with the training images and time so far, is
        appended to `history` and returned. Stopped when `stop()` (collective) is True before a chunk:
        nothing is appended."""
        was_training = mvar.training
        mvar.eval()
        top_k = min(self.top_k, mvar.V)
        device = mvar.pos_1LC.device
        rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])  # training's draws unchanged

        def generated(start: int, stop: int) -> np.ndarray:
            label_B = torch.arange(start, stop, device=device) % mvar.num_classes
            with mvar.inference_precision(self.dtype):
                img_B3HW = mvar.autoregressive_infer_cfg(stop - start, label_B, g_seed=chunk_seed(self.seed, start),
                                                         cfg=self.cfg, top_k=top_k, top_p=self.top_p)
            return to_uint8_BHW3(img_B3HW)
        try:
            with rng:
                feats, classes = sharded_features(self.n, generated, self.features, stop)
        finally:
            mvar.train(was_training)
        point = {"epoch": epoch, "images": images_seen, "train_s": train_seconds,
                 self.metric: frechet_distance_of_features(feats, self.ref_feats)}
        if classes is not None:
            point["consistency"] = float((classes == np.arange(self.n) % mvar.num_classes).mean())
        point.update(tf32=self.tf32, eval=self.settings)
        self.history.append(point)
        return point

    def scores(self, point: dict) -> dict[str, float]:
        """A point's scores: the metric, and class consistency when the network classifies."""
        return {k: point[k] for k in (self.metric, "consistency") if k in point}

    def load_history(self, history: Sequence[dict] | None) -> None:
        """A resumed run continues the curve of its checkpoint (after `prepare`); other settings are logged."""
        self.history = [dict(p) for p in history or ()]
        recorded = next((p["eval"] for p in reversed(self.history) if "eval" in p), None)
        if recorded is not None and recorded != self.settings:
            changed = ", ".join(f"{k} {recorded.get(k)!r} -> {v!r}" for k, v in self.settings.items()
                                if recorded.get(k) != v)
            logger.warning("the resumed evaluation curve's points were made with other settings (%s): the points from "
                           "here on are not comparable with the earlier ones (each point records its settings under "
                           "'eval')", changed, extra=SAME_ON_ALL_RANKS)
