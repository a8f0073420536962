"""utils.evaluation.scores: the study's classifier-space scores on sets whose answers are known."""
import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from utils.evaluation.classifier import accuracy, train_classifier
from utils.evaluation.scores import ClassifierView, classifier_scores, classifier_view


@pytest.fixture(scope="module")
def classifier_and_images():
    rng = np.random.default_rng(0)
    # ten classes of images: noise around a per-class grey level, and a classifier trained on them
    labels = np.repeat(np.arange(10), 40)
    images = np.clip(rng.normal(25 * labels[:, None, None, None], 6, (400, 16, 16, 3)), 0, 255).astype(np.uint8)
    x_N3HW = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    data = TensorDataset(x_N3HW, torch.from_numpy(labels))
    model = train_classifier(data, 10, epochs=15, batch_size=32, seed=0, ch=8)
    return model, images, labels, accuracy(model, data)


def test_a_set_against_itself_is_perfect(classifier_and_images):
    model, images, labels, acc = classifier_and_images
    # batches must not change the features (a conv may block a batch of 400 differently from 64: fp32 rounding)
    view = classifier_view(model, images, batch_size=64)
    assert np.allclose(view.feats_ND, classifier_view(model, images, batch_size=400).feats_ND, atol=1e-6)
    s = classifier_scores(view, labels, view)
    assert abs(s["fd_clf"]) < 1e-6
    # every point lies in its own k-NN ball, except the 5% whose radius the outlier clamp zeroes (the distance of a
    # point to itself comes out of |a|^2 - 2ab + |b|^2 as a rounding error, not exactly 0)
    assert s["precision"] >= 0.95 and s["recall"] >= 0.95
    assert s["consistency"] == pytest.approx(acc) and acc > 0.9  # consistency = the classifier's accuracy
    assert 4.0 < s["is_clf"] <= 10.0  # fairly confident, spread over the ten classes


def test_other_images_score_worse(classifier_and_images):
    model, images, labels, _ = classifier_and_images
    ref = classifier_view(model, images)
    is_all_classes = classifier_scores(ref, labels, ref)["is_clf"]
    half = classifier_scores(classifier_view(model, images[:200]), labels[:200], ref)  # five of the ten classes
    assert half["fd_clf"] > 1.0 and half["recall"] < 0.7 and half["precision"] > 0.9 and half["is_clf"] < is_all_classes
    wrong = classifier_scores(classifier_view(model, images), np.roll(labels, 40), ref)  # asked for another class
    assert wrong["consistency"] < 0.2


def test_precision_drops_the_reference_radii_above_the_95th_percentile():
    """The study's precision and recall drop the top 5% of the k-NN radii, as its recorded numbers were computed
    (scripts/fid.py drops none): samples beside a lone far reference point lie in no kept ball. Dropping none passed
    the suite, and would have changed the study's precision without a word."""
    ref, sample = np.zeros((21, 2)), np.zeros((5, 2))
    ref[:20, 0], ref[20, 0] = np.arange(20), 1000.0  # 20 points 1 apart, and one far away
    sample[:, 0] = 1000.5 + np.arange(5)  # beside the far point, inside its k=3 ball (radius ~ 980)
    uniform = np.full((21, 10), 0.1)  # the probabilities play no part in precision
    assert classifier_scores(ClassifierView(sample, uniform[:5]), np.zeros(5, int),
                             ClassifierView(ref, uniform))["precision"] == 0.0
