"""Scores of a set of class-conditional images against the real test images, for small-image studies.

Two feature spaces:
- a classifier trained on the real training labels (utils.evaluation.classifier.SmallCNN): the Frechet distance of its
  pooled features (FD_clf), its Inception-Score analogue (IS_clf), k-NN precision/recall, and class consistency
  (share of images classified as the class they were generated for). Cheap: every image of every model.
- the FID Inception network (utils.evaluation.inception): FID on a subset, since one 299 px Inception pass costs
  ~0.14 s per image on a 2-core CPU.
All images are uint8 (N, H, W, 3), the format of FID dumps, so real, reconstructed and generated sets are
quantised alike.
"""
from dataclasses import dataclass

import numpy as np
import torch

from utils.evaluation.classifier import SmallCNN
from utils.evaluation.fid import frechet_distance_of_features, inception_score, precision_recall
from utils.evaluation.inception import InceptionFeatures


@dataclass
class ClassifierView:
    """A set of images as the classifier sees it: pooled features (N, D) and softmax probabilities (N, K)."""

    feats_ND: np.ndarray
    probs_NK: np.ndarray


@torch.no_grad()
def classifier_view(model: SmallCNN, imgs_NHW3: np.ndarray, batch_size: int = 500) -> ClassifierView:
    """Run the classifier (eval mode) over uint8 images."""
    model.eval()
    feats, probs = [], []
    for start in range(0, len(imgs_NHW3), batch_size):
        x_B3HW = torch.from_numpy(np.ascontiguousarray(imgs_NHW3[start:start + batch_size])).permute(0, 3, 1, 2)
        f_BD = model.embed(x_B3HW.float() / 127.5 - 1)
        feats.append(f_BD.double())
        probs.append(model.head(f_BD).softmax(-1).double())
    return ClassifierView(torch.cat(feats).numpy(), torch.cat(probs).numpy())


def classifier_scores(sample: ClassifierView, labels_N: np.ndarray, ref: ClassifierView) -> dict[str, float]:
    """FD_clf, IS_clf, precision, recall (k=3, against `ref`) and class consistency of `sample`."""
    # radii above the 95th percentile dropped, as the study's recorded numbers were computed (scripts/fid.py,
    # following OpenAI's evaluator, drops none)
    precision, recall = precision_recall(ref.feats_ND, sample.feats_ND, drop_top_percent=5.0)
    return {
        "fd_clf": frechet_distance_of_features(sample.feats_ND, ref.feats_ND),
        "is_clf": inception_score(sample.probs_NK, split_size=len(sample.probs_NK)),
        "precision": precision, "recall": recall,
        "consistency": float((sample.probs_NK.argmax(1) == np.asarray(labels_N)).mean()),
    }


def inception_features(inception: InceptionFeatures, imgs_NHW3: np.ndarray, batch_size: int = 50) -> np.ndarray:
    """The Inception pool features (N, 2048) of uint8 images."""
    feats_ND, _ = inception.extract(imgs_NHW3[i:i + batch_size] for i in range(0, len(imgs_NHW3), batch_size))
    return feats_ND


def inception_fid(inception: InceptionFeatures, imgs_NHW3: np.ndarray, ref_feats_ND: np.ndarray) -> float:
    """FID of uint8 images against the Inception features of a reference set."""
    return frechet_distance_of_features(inception_features(inception, imgs_NHW3), ref_feats_ND)
