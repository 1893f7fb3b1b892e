"""Tests of fastsample.metrics: scores against reference implementations, streaming statistics,
feature extractors (with a stand-in for the Inception TorchScript file) and reference files."""

from __future__ import annotations

import urllib.error
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from fastsample.metrics import (
    INCEPTION_ENV,
    INCEPTION_FILE,
    ClassifierFeatures,
    CleanFIDInception,
    FeatureStats,
    ModuleFeatures,
    check_compatible,
    extract,
    frechet_distance,
    inception_score,
    kid,
    load_reference,
    precision_recall,
    save_reference,
)
from fastsample.metrics import features as features_module
from fastsample.utils.errors import NumericalError, UserError
from fastsample.utils.io import save_npz_atomic


def gaussian_features(n: int, dim: int, seed: int, shift: float = 0.0, scale: float = 1.0) -> np.ndarray:
    # One fixed correlated distribution per dimension; ``seed`` only picks the sample.
    mixing = np.random.default_rng(dim).standard_normal((dim, dim)) / np.sqrt(dim) + np.eye(dim)
    return (np.random.default_rng(seed).standard_normal((n, dim)) @ mixing) * scale + shift


def stats_of(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return features.mean(axis=0), np.cov(features, rowvar=False)


# ------------------------------------------------------------------------------------------------
# FID


def scipy_frechet(mu1, sigma1, mu2, sigma2) -> float:
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1 + sigma2 - 2 * covmean))


def test_frechet_matches_scipy_sqrtm_and_libraries():
    from cleanfid.fid import frechet_distance as cleanfid_frechet
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    mu1, sigma1 = stats_of(gaussian_features(500, 64, seed=0))
    mu2, sigma2 = stats_of(gaussian_features(500, 64, seed=1, shift=0.3, scale=1.2))
    ours = frechet_distance(mu1, sigma1, mu2, sigma2)
    assert ours == pytest.approx(scipy_frechet(mu1, sigma1, mu2, sigma2), rel=1e-6)
    assert ours == pytest.approx(cleanfid_frechet(mu1, sigma1, mu2, sigma2), rel=1e-6)
    fidelity = fid_statistics_to_metric({"mu": mu1, "sigma": sigma1}, {"mu": mu2, "sigma": sigma2}, False)
    assert ours == pytest.approx(fidelity["frechet_inception_distance"], rel=1e-6)


def test_frechet_singular_covariance_matches_eigenvalue_formula():
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    # Fewer samples than dimensions: Cholesky fails and the symmetric square root is used instead.
    mu1, sigma1 = stats_of(gaussian_features(20, 32, seed=0))
    mu2, sigma2 = stats_of(gaussian_features(40, 32, seed=1, shift=0.5))
    expected = fid_statistics_to_metric({"mu": mu1, "sigma": sigma1}, {"mu": mu2, "sigma": sigma2}, False)
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(
        expected["frechet_inception_distance"], rel=1e-6
    )


def test_frechet_of_a_set_with_itself_is_zero():
    mu, sigma = stats_of(gaussian_features(300, 32, seed=0))
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_frechet_grows_with_noise():
    base = gaussian_features(2000, 16, seed=0)
    noise = np.random.default_rng(1).standard_normal(base.shape)
    reference = stats_of(base)
    distances = [frechet_distance(*reference, *stats_of(base + level * noise)) for level in (0.1, 0.3, 1, 3)]
    assert all(a < b for a, b in zip(distances, distances[1:], strict=False))


class PassThrough(nn.Module):
    """A 'feature extractor' for torchmetrics that returns its input (already features)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.num_features = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_frechet_matches_torchmetrics_with_custom_module():
    from torchmetrics.image.fid import FrechetInceptionDistance

    real = gaussian_features(400, 24, seed=0)
    fake = gaussian_features(300, 24, seed=1, shift=0.2)
    metric = FrechetInceptionDistance(feature=PassThrough(24))
    metric.update(torch.from_numpy(real), real=True)
    metric.update(torch.from_numpy(fake), real=False)
    ours = frechet_distance(*stats_of(real), *stats_of(fake))
    assert ours == pytest.approx(float(metric.compute()), rel=1e-6)


def test_frechet_rejects_mismatched_dimensions():
    with pytest.raises(UserError, match="16 vs 8"):
        frechet_distance(np.zeros(16), np.eye(16), np.zeros(8), np.eye(8))


# ------------------------------------------------------------------------------------------------
# KID, IS, precision / recall


def test_kid_on_full_sets_matches_cleanfid_and_torch_fidelity():
    from cleanfid.fid import kernel_distance
    from torch_fidelity.metric_kid import kid_features_to_metric

    x = gaussian_features(150, 16, seed=0)
    y = gaussian_features(120, 16, seed=1, shift=0.3)
    # With the subset size equal to the smaller set and one subset, random subsets cannot differ.
    ours, std = kid(x[:120], y, subsets=1, subset_size=10_000)
    assert std == 0.0
    assert ours == pytest.approx(kernel_distance(x[:120], y, num_subsets=1, max_subset_size=120), rel=1e-9)
    fidelity = kid_features_to_metric(
        torch.from_numpy(x[:120]), torch.from_numpy(y), kid_subsets=1, kid_subset_size=120, verbose=False
    )
    assert ours == pytest.approx(fidelity["kernel_inception_distance_mean"], rel=1e-9)


def test_kid_near_zero_for_same_distribution_positive_for_different():
    x = gaussian_features(600, 8, seed=0)
    same, same_std = kid(x, gaussian_features(600, 8, seed=1), subsets=20, subset_size=300)
    different, _ = kid(x, gaussian_features(600, 8, seed=2, shift=1.0), subsets=20, subset_size=300)
    assert abs(same) < 3 * same_std + 1e-3
    assert different > 0.1 > abs(same)


def test_kid_is_unbiased():
    # Averaged over many independent small draws from one distribution, unbiased MMD^2 is ~0, whereas
    # the biased estimator (keeping the kernel diagonals) would be clearly positive at m = 10.
    draws = [np.random.default_rng(i).standard_normal((10, 4)) for i in range(600)]
    values = [kid(draws[2 * i], draws[2 * i + 1], subsets=1)[0] for i in range(300)]
    assert abs(np.mean(values)) < 4 * np.std(values) / np.sqrt(len(values))


def test_kid_subset_size_is_clipped_and_too_few_samples_fail():
    assert kid(np.ones((3, 2)), np.zeros((5, 2)), subsets=2, subset_size=1000)[0] > 0
    with pytest.raises(UserError, match="at least 2 samples"):
        kid(np.ones((1, 2)), np.ones((5, 2)))


def test_inception_score_extremes_and_torch_fidelity():
    from torch_fidelity.metric_isc import isc_features_to_metric

    assert inception_score(np.zeros((100, 10)), splits=5)[0] == pytest.approx(1.0)
    confident = 50.0 * np.eye(10)[np.arange(1000) % 10]
    mean, std = inception_score(confident, splits=10)
    assert mean == pytest.approx(10.0, rel=1e-6) and std < 1e-6
    logits = np.random.default_rng(0).standard_normal((503, 20)) * 3
    expected = isc_features_to_metric(torch.from_numpy(logits), splits=7, shuffle=False)
    ours = inception_score(logits, splits=7)
    assert ours[0] == pytest.approx(expected["inception_score_mean"], rel=1e-9)
    assert ours[1] == pytest.approx(expected["inception_score_std"], rel=1e-6)
    with pytest.raises(UserError, match="splits=10"):
        inception_score(logits[:5])


def test_precision_recall_identical_and_disjoint():
    x = gaussian_features(200, 8, seed=0)
    assert precision_recall(x, x, batch_size=64) == (1.0, 1.0)
    assert precision_recall(x, x + 1000.0) == (0.0, 0.0)
    with pytest.raises(UserError, match="k=3"):
        precision_recall(x[:3], x)


def test_precision_recall_matches_torch_fidelity():
    from torch_fidelity.metric_prc import calculate_precision_recall_full

    real = gaussian_features(300, 6, seed=0)
    fake = gaussian_features(250, 6, seed=1, shift=0.5, scale=0.7)
    # torch-fidelity's convention: features_1 is generated, features_2 is real; it averages in float32.
    expected = calculate_precision_recall_full(torch.from_numpy(fake), torch.from_numpy(real), 3, 10_000)
    assert precision_recall(real, fake, k=3, batch_size=50) == pytest.approx(expected, abs=1e-6)


# ------------------------------------------------------------------------------------------------
# Streaming statistics


def test_streaming_equals_whole_array_and_merge():
    feats = gaussian_features(1000, 12, seed=0, shift=3.0)
    whole = FeatureStats().update(feats)
    batched = FeatureStats()
    for chunk in np.array_split(feats, 7):
        batched.update(torch.from_numpy(chunk).float())  # float32 input, float64 accumulation
    np.testing.assert_allclose(whole.mu, feats.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(whole.sigma, np.cov(feats, rowvar=False), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(batched.sigma, whole.sigma, rtol=1e-6, atol=1e-6)
    merged = FeatureStats().update(feats[:333]).merge(FeatureStats().update(feats[333:]))
    assert merged.count == 1000
    np.testing.assert_allclose(merged.mu, whole.mu, rtol=1e-12)
    np.testing.assert_allclose(merged.sigma, whole.sigma, rtol=1e-10, atol=1e-12)


def test_streaming_is_accurate_with_a_large_mean():
    # Raw sums (sum x x^T - n mu mu^T) would lose ~8 digits here; the centred update does not.
    feats = gaussian_features(500, 4, seed=0) + 1e4
    stats = FeatureStats()
    for chunk in np.array_split(feats, 10):
        stats.update(chunk)
    np.testing.assert_allclose(stats.sigma, np.cov(feats, rowvar=False), rtol=1e-9)


def test_kept_rows_state_dict_and_errors():
    feats, logits = gaussian_features(50, 3, seed=0), np.zeros((50, 5))
    stats = FeatureStats(keep_features=30, keep_logits=100)
    for start in range(0, 50, 20):
        stats.update(feats[start : start + 20], logits[start : start + 20])
    assert stats.features.shape == (30, 3) and stats.logits.shape == (50, 5)
    np.testing.assert_allclose(stats.features, feats[:30], rtol=1e-6)
    restored = FeatureStats().load_state_dict(stats.state_dict())
    assert restored.count == 50 and restored.features.shape == (30, 3)
    np.testing.assert_array_equal(restored.sigma, stats.sigma)
    with pytest.raises(UserError, match="at least 2 samples, got 1"):
        _ = FeatureStats().update(feats[:1]).sigma
    with pytest.raises(UserError, match="at least 1 samples, got 0"):
        _ = FeatureStats().mu
    with pytest.warns(UserWarning, match="singular"):
        _ = FeatureStats().update(feats[:3]).sigma
    with pytest.raises(NumericalError, match="1 of 2"):
        FeatureStats().update(np.array([[0.0, np.nan], [0.0, 1.0]]))
    with pytest.raises(UserError, match="from 3 to 4"):
        FeatureStats().update(feats).update(np.zeros((2, 4)))


# ------------------------------------------------------------------------------------------------
# Feature extractors


class TinyClassifier(nn.Module):
    """Duck-typed stand-in for NoisyClassifier: features(x, noise_labels) and logits."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.head = nn.Linear(4, 10)
        self.seen_labels: torch.Tensor | None = None

    def features(self, x: torch.Tensor, noise_labels: torch.Tensor) -> torch.Tensor:
        self.seen_labels = noise_labels
        return self.trunk(x)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x, noise_labels))


def test_classifier_features_name_hash_and_modes():
    classifier = TinyClassifier().train()
    extractor = ClassifierFeatures(classifier)
    images = torch.rand(6, 1, 8, 8) * 2 - 1
    output = extractor(images)
    assert output["features"].shape == (6, 4) and output["logits"].shape == (6, 10)
    assert torch.equal(classifier.seen_labels, torch.zeros(6))
    assert classifier.training and classifier.trunk[1].training  # the caller's mode is restored
    name = extractor.name
    assert name.startswith("classifier:") and name.endswith(extractor.weights_hash)
    with torch.no_grad():
        classifier.head.bias.add_(1.0)
    assert extractor.name != name
    with pytest.raises(UserError, match="ModuleFeatures"):
        ClassifierFeatures(nn.Linear(2, 2))


def test_uint8_and_float_inputs_agree_and_bad_shapes_fail():
    extractor = ModuleFeatures(nn.Sequential(nn.Flatten()), label="pixels")
    uint8 = torch.randint(0, 256, (3, 4, 4, 1), dtype=torch.uint8)
    as_float = uint8.permute(0, 3, 1, 2).float() / 127.5 - 1
    torch.testing.assert_close(extractor(uint8)["features"], extractor(as_float)["features"])
    assert extractor(uint8.numpy())["logits"] is None
    assert extractor.name.startswith("pixels:")
    with pytest.raises(UserError, match=r"\(N, H, W, C\)"):
        extractor(uint8.permute(0, 3, 1, 2).repeat(1, 1, 1, 2))
    with pytest.raises(UserError, match=r"\(N, C, H, W\)"):
        extractor(torch.zeros(2, 5, 4, 4))


def test_module_features_tuple_and_dict_outputs():
    class TwoHeads(nn.Module):
        def __init__(self, as_dict: bool) -> None:
            super().__init__()
            self.as_dict = as_dict

        def forward(self, x):
            features, logits = x.mean(dim=(2, 3)), x.amax(dim=(2, 3))
            return {"features": features, "logits": logits} if self.as_dict else (features, logits)

    images = torch.rand(2, 3, 4, 4)
    for as_dict in (False, True):
        output = ModuleFeatures(TwoHeads(as_dict), channels=3)(images)
        assert output["features"].shape == (2, 3) and output["logits"].shape == (2, 3)


def test_extract_streams_arrays_and_loaders_identically():
    extractor = ModuleFeatures(nn.Sequential(nn.AvgPool2d(2), nn.Flatten()))
    images = torch.randint(0, 256, (37, 8, 8, 1), dtype=torch.uint8)
    whole = extract(extractor, images, batch_size=100, keep_features=10)
    dataset = torch.utils.data.TensorDataset(images, torch.zeros(37))
    loader = torch.utils.data.DataLoader(dataset, batch_size=8)
    streamed = extract(extractor, loader, batch_size=5)
    assert whole.count == streamed.count == 37 and whole.features.shape == (10, 16)
    np.testing.assert_allclose(streamed.sigma, whole.sigma, rtol=1e-9, atol=1e-12)


class FakeInception(nn.Module):
    """Same interface as clean-fid's inception-2015-12-05.pt (layers, output, forward kwargs), tiny."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Conv2d(3, 2048, 2))
        self.output = nn.Linear(2048, 1008)

    def forward(
        self,
        img: torch.Tensor,
        return_features: bool = False,
        use_fp16: bool = False,
        no_output_bias: bool = False,
    ) -> torch.Tensor:
        x = torch.nn.functional.interpolate(img.float(), size=(299, 299), mode="bilinear")
        return self.layers((x - 128.0) / 128.0).reshape(-1, 2048)


@pytest.fixture
def fake_inception(tmp_path, monkeypatch):
    path = tmp_path / INCEPTION_FILE
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated in new torch
        torch.jit.script(FakeInception()).save(str(path))
    monkeypatch.setenv(INCEPTION_ENV, str(path))
    return path


@pytest.mark.parametrize("mode", ["clean", "legacy_tensorflow"])
def test_cleanfid_inception_with_a_placed_weights_file(fake_inception, mode):
    extractor = CleanFIDInception(mode=mode).to("cpu")
    assert extractor.net is None  # nothing is loaded before first use
    gray = torch.randint(0, 256, (2, 16, 16, 1), dtype=torch.uint8)
    output = extractor(gray)
    assert output["features"].shape == (2, 2048) and output["logits"].shape == (2, 1008)
    # IS logits are the classifier layer without its bias, as StyleGAN / EDM compute them.
    torch.testing.assert_close(output["logits"], output["features"] @ extractor.net.output.weight.T)
    as_float = gray.permute(0, 3, 1, 2).float() / 127.5 - 1
    torch.testing.assert_close(extractor(as_float)["features"], output["features"])
    assert extractor.name == features_module.INCEPTION_MODES[mode]
    assert extractor.weights_hash == features_module.file_hash(fake_inception)


def test_clean_mode_reproduces_cleanfid_pipeline(fake_inception):
    from cleanfid.inception_torchscript import InceptionV3W
    from cleanfid.resize import build_resizer

    images = np.random.default_rng(0).integers(0, 256, (3, 20, 20, 3), dtype=np.uint8)
    resized = torch.from_numpy(np.stack([build_resizer("clean")(image) for image in images]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        expected = InceptionV3W(str(fake_inception.parent), download=False)(resized.permute(0, 3, 1, 2))
    torch.testing.assert_close(CleanFIDInception()(images)["features"], expected)


def test_cleanfid_inception_offline_error_names_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv(INCEPTION_ENV, raising=False)
    monkeypatch.setattr(features_module, "cleanfid_weights_dir", lambda: tmp_path)

    def no_network(url, path, timeout=60.0):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(features_module, "download_file", no_network)
    with pytest.raises(UserError) as error:
        CleanFIDInception()(torch.zeros(1, 3, 8, 8))
    message = str(error.value)
    assert INCEPTION_FILE in message and str(tmp_path / INCEPTION_FILE) in message
    assert features_module.inception_url() in message and INCEPTION_ENV in message
    with pytest.raises(UserError, match="downloads are disabled"):
        _ = CleanFIDInception(download=False).weights_hash
    monkeypatch.setenv(INCEPTION_ENV, str(tmp_path / "missing.pt"))
    with pytest.raises(UserError, match=f"{INCEPTION_ENV}.*no such file"):
        _ = CleanFIDInception().weights_hash
    with pytest.raises(UserError, match="features.mode"):
        CleanFIDInception(mode="bilinear")


# ------------------------------------------------------------------------------------------------
# Reference statistics


def reference_stats(n: int = 100, dim: int = 4) -> FeatureStats:
    return FeatureStats().update(gaussian_features(n, dim, seed=0))


def test_reference_round_trip_with_metadata(tmp_path):
    extractor = ModuleFeatures(nn.Flatten(), label="flat")
    stats = reference_stats(dim=16)
    path = tmp_path / "ref.npz"
    save_reference(path, stats, extractor, dataset="digits", split="train", resolution=4)
    ref = load_reference(path)
    np.testing.assert_array_equal(ref.mu, stats.mu)
    np.testing.assert_array_equal(ref.sigma, stats.sigma)
    assert ref.metadata() == {
        "extractor": extractor.name,
        "weights_hash": extractor.weights_hash,
        "dataset": "digits",
        "split": "train",
        "count": 100,
        "resolution": 4,
    }
    assert "digits/train (100 images, 4px" in ref.describe()
    check_compatible(ref, extractor)
    with np.load(path) as data:  # EDM's fid.py reads only these two keys
        assert data["mu"].dtype == np.float64 and data["sigma"].shape == (16, 16)


def test_edm_style_reference_without_metadata_loads(tmp_path):
    stats = reference_stats()
    path = tmp_path / "cifar10-32x32.npz"
    save_npz_atomic(path, mu=stats.mu, sigma=stats.sigma)
    ref = load_reference(path)
    assert ref.extractor is None and ref.count is None
    assert "unknown/unknown (unknown images" in ref.describe()
    with pytest.warns(UserWarning, match="do not record"):
        check_compatible(ref, ModuleFeatures(nn.Flatten()))


def test_foreign_extractor_and_bad_files_refused(tmp_path):
    path = tmp_path / "ref.npz"
    save_reference(path, reference_stats(), "inception-v3-clean", dataset="cifar10")
    extractor = ModuleFeatures(nn.Flatten(), label="flat")
    with pytest.raises(UserError, match=f"'inception-v3-clean', not '{extractor.name}'"):
        check_compatible(load_reference(path), extractor)
    save_reference(path, reference_stats(), extractor, weights_hash="0123456789ab")
    with pytest.raises(UserError, match="0123456789ab"):
        check_compatible(load_reference(path), extractor)
    save_npz_atomic(path, mu=np.zeros(3), features=np.zeros((2, 3)))
    with pytest.raises(UserError, match="lacks sigma"):
        load_reference(path)
    with pytest.raises(UserError, match="does not exist"):
        load_reference(tmp_path / "nope.npz")
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(UserError, match="not a readable .npz"):
        load_reference(tmp_path / "junk.npz")
