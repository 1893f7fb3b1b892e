"""The analytic Gaussian mixture: exact denoiser (Tweedie), density, class posterior, sampling, fitting.

Every quantity is compared with an independent computation: autograd of the log-density, dense
covariances with scipy / numpy, Bayes' rule written out, or Monte Carlo moments.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

from fastsample.models.gmm import GaussianMixture
from fastsample.utils.errors import UserError

pytestmark = pytest.mark.usefixtures("single_thread")

SIGMAS = (0.01, 0.3, 1.0, 5.0, 80.0)


def dense_covariances(gmm: GaussianMixture) -> np.ndarray:
    """(K, D, D) covariances ``U diag(v_top) U^T + v_rest (I - U U^T)`` built densely."""
    eye = np.eye(gmm.dim)
    covs = []
    for k in range(gmm.means.shape[0]):
        basis = gmm.bases[k].numpy()
        top = basis @ np.diag(gmm.var_top[k].numpy()) @ basis.T
        covs.append(top + float(gmm.var_rest[k]) * (eye - basis @ basis.T))
    return np.stack(covs)


def dense_component_log_probs(gmm: GaussianMixture, x: np.ndarray, sigma: float) -> np.ndarray:
    """log w_k + log N(x; m_k, C_k + sigma^2 I) with scipy, (B, K)."""
    covs = dense_covariances(gmm) + sigma**2 * np.eye(gmm.dim)
    weights = gmm.log_weights.numpy()
    return np.stack(
        [
            weights[k] + multivariate_normal(gmm.means[k].numpy(), covs[k]).logpdf(x)
            for k in range(len(weights))
        ],
        axis=-1,
    ).reshape(len(x), -1)


def dense_posterior_means(gmm: GaussianMixture, x: np.ndarray, sigma: float) -> np.ndarray:
    """E[x0 | x, component k] = m_k + C_k (C_k + sigma^2 I)^-1 (x - m_k), (B, K, D)."""
    covs = dense_covariances(gmm)
    means = gmm.means.numpy()
    out = []
    for k in range(len(means)):
        gain = covs[k] @ np.linalg.inv(covs[k] + sigma**2 * np.eye(gmm.dim))
        out.append(means[k] + (x - means[k]) @ gain.T)
    return np.stack(out, axis=1)


@pytest.fixture(scope="module", params=["two_blobs", "ring", "grid", "digits"])
def mixture(request) -> GaussianMixture:
    if request.param == "digits":
        return request.getfixturevalue("digits_gmm")
    return GaussianMixture.toy(request.param)


def _points(gmm: GaussianMixture, sigma: float, count: int = 6, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x0, _ = gmm.sample(count, generator)
    return x0 + sigma * torch.randn(x0.shape, generator=generator, dtype=torch.float64)


@pytest.mark.parametrize("sigma", SIGMAS)
def test_tweedie_denoiser_is_the_score(mixture: GaussianMixture, sigma: float) -> None:
    """D(x, s) = x + s^2 grad log p_s(x), the score taken by autograd of the exact log-density."""
    x = _points(mixture, sigma).requires_grad_(True)
    (score,) = torch.autograd.grad(mixture.log_prob(x, sigma).sum(), x)
    denoised = mixture(x.detach(), sigma)
    scale = 1.0 + float(x.detach().abs().max())
    torch.testing.assert_close(denoised, x.detach() + sigma**2 * score, rtol=0, atol=1e-12 * scale)


@pytest.mark.parametrize("sigma", [0.0, 0.1, 2.0])
def test_log_prob_matches_dense_gaussians(mixture: GaussianMixture, sigma: float) -> None:
    x = _points(mixture, max(sigma, 0.05))
    expected = logsumexp(dense_component_log_probs(mixture, x.reshape(len(x), -1).numpy(), sigma), axis=1)
    torch.testing.assert_close(mixture.log_prob(x, sigma), torch.from_numpy(expected), rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("sigma", [0.05, 0.7, 3.0])
def test_denoiser_matches_dense_posterior_mean(mixture: GaussianMixture, sigma: float) -> None:
    x = _points(mixture, sigma)
    flat = x.reshape(len(x), -1).numpy()
    logits = dense_component_log_probs(mixture, flat, sigma)
    responsibilities = np.exp(logits - logsumexp(logits, axis=1, keepdims=True))
    expected = np.einsum("bk,bkd->bd", responsibilities, dense_posterior_means(mixture, flat, sigma))
    torch.testing.assert_close(
        mixture(x, sigma).reshape(len(x), -1), torch.from_numpy(expected), rtol=1e-9, atol=1e-9
    )


def test_per_row_sigmas_match_scalar_calls(toy_gmm: GaussianMixture) -> None:
    x = _points(toy_gmm, 1.0, count=4)
    sigma = torch.tensor([0.1, 0.5, 2.0, 10.0], dtype=torch.float64)
    rows = torch.cat([toy_gmm(x[i : i + 1], float(sigma[i])) for i in range(4)])
    torch.testing.assert_close(toy_gmm(x, sigma), rows, rtol=1e-14, atol=1e-14)


# --- sampling ------------------------------------------------------------------------------------


def test_sample_moments_match_the_mixture(mixture: GaussianMixture) -> None:
    count = 100_000 if mixture.dim <= 2 else 40_000
    x0, labels = mixture.sample(count, torch.Generator().manual_seed(5))
    flat = x0.reshape(count, -1).numpy()
    weights = mixture.log_weights.exp().numpy()
    means = mixture.means.numpy()
    mean = weights @ means
    offsets = means - mean
    cov = np.einsum("k,kij->ij", weights, dense_covariances(mixture)) + np.einsum(
        "k,ki,kj->ij", weights, offsets, offsets
    )
    var = np.diag(cov)
    assert np.abs(flat.mean(0) - mean).max() < 5 * math.sqrt(var.max() / count)
    cov_se = np.sqrt((np.outer(var, var) + cov**2) / count)
    assert (np.abs(np.cov(flat.T) - cov) / cov_se).max() < 5.5
    # component / class frequencies follow the weights
    class_weights = np.bincount(mixture.labels.numpy(), weights=weights, minlength=mixture.num_classes)
    frequencies = np.bincount(labels.numpy(), minlength=mixture.num_classes) / count
    assert np.abs(frequencies - class_weights).max() < 5 * math.sqrt(0.25 / count)
    assert x0.shape == (count, *mixture.image_shape) and x0.dtype == torch.float64


def test_sample_is_reproducible_and_class_restricted(toy_gmm: GaussianMixture) -> None:
    a, _ = toy_gmm.sample(50, torch.Generator().manual_seed(3))
    b, _ = toy_gmm.sample(50, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    wanted = torch.tensor([1] * 500 + [0] * 500)
    x0, labels = toy_gmm.sample(1000, torch.Generator().manual_seed(4), class_labels=wanted)
    assert torch.equal(labels, wanted)
    torch.testing.assert_close(x0[:500].mean(0), toy_gmm.means[1], rtol=0, atol=0.1)
    torch.testing.assert_close(x0[500:].mean(0), toy_gmm.means[0], rtol=0, atol=0.1)


# --- classes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [0.0, 0.5, 4.0])
def test_class_posterior_is_bayes(mixture: GaussianMixture, sigma: float) -> None:
    x = _points(mixture, max(sigma, 0.1), count=8)
    posterior = mixture.class_log_posterior(x, sigma).exp()
    torch.testing.assert_close(posterior.sum(1), torch.ones(8, dtype=torch.float64), rtol=0, atol=1e-12)
    joint = dense_component_log_probs(mixture, x.reshape(8, -1).numpy(), sigma)  # log w_k p_k(x)
    per_class = np.stack(
        [logsumexp(joint[:, mixture.labels.numpy() == c], axis=1) for c in range(mixture.num_classes)], axis=1
    )
    expected = np.exp(per_class - logsumexp(per_class, axis=1, keepdims=True))
    torch.testing.assert_close(posterior, torch.from_numpy(expected), rtol=1e-8, atol=1e-10)


def test_toy_class_posterior_by_hand(toy_gmm: GaussianMixture) -> None:
    """Two equally weighted axis-aligned Gaussians: p(c=1 | x) = 1 / (1 + N_0(x) / N_1(x))."""
    x = torch.tensor([[0.0, 0.0], [1.0, -0.5], [-0.3, 0.9]], dtype=torch.float64)
    sigma = 0.4
    var = toy_gmm.var_top + sigma**2  # (2, 2): per-component, per-axis variances
    log_n = (
        -0.5 * ((x[:, None] - toy_gmm.means[None]) ** 2 / var[None] + var[None].log() + math.log(2 * math.pi))
    ).sum(-1)
    expected = torch.sigmoid(log_n[:, 1] - log_n[:, 0])
    posterior = toy_gmm.class_log_posterior(x, sigma).exp()
    torch.testing.assert_close(posterior[:, 1], expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("sigma", [0.05, 1.0, 10.0])
def test_class_conditional_denoising_restricts_to_the_class(mixture: GaussianMixture, sigma: float) -> None:
    x = _points(mixture, sigma, count=5)
    flat = x.reshape(5, -1).numpy()
    logits = dense_component_log_probs(mixture, flat, sigma)
    posterior_means = dense_posterior_means(mixture, flat, sigma)
    labels = mixture.labels.numpy()
    unconditional = mixture(x, sigma)
    mix = torch.zeros_like(unconditional)
    class_post = mixture.class_log_posterior(x, sigma).exp()
    for c in range(mixture.num_classes):
        conditional = mixture(x, sigma, class_labels=torch.full((5,), c))
        members = logits[:, labels == c]
        weights = np.exp(members - logsumexp(members, axis=1, keepdims=True))
        expected = np.einsum("bk,bkd->bd", weights, posterior_means[:, labels == c])
        torch.testing.assert_close(
            conditional.reshape(5, -1), torch.from_numpy(expected), rtol=1e-9, atol=1e-9
        )
        mix += class_post[:, c].reshape(5, *([1] * (x.ndim - 1))) * conditional
    # the law of total expectation ties the classes back to the unconditional denoiser
    torch.testing.assert_close(mix, unconditional, rtol=1e-9, atol=1e-9)


def test_null_labels_mean_unconditional_and_rows_are_independent(toy_gmm: GaussianMixture) -> None:
    x = _points(toy_gmm, 0.5, count=4)
    unconditional = toy_gmm(x, 0.5)
    for null in (-1, toy_gmm.num_classes):
        torch.testing.assert_close(toy_gmm(x, 0.5, class_labels=torch.full((4,), null)), unconditional)
    mixed = toy_gmm(x, 0.5, class_labels=torch.tensor([0, 1, -1, 1]))
    torch.testing.assert_close(mixed[0], toy_gmm(x[:1], 0.5, class_labels=torch.tensor([0]))[0])
    torch.testing.assert_close(mixed[1], toy_gmm(x[1:2], 0.5, class_labels=torch.tensor([1]))[0])
    torch.testing.assert_close(mixed[2], unconditional[2])


def test_small_sigma_conditional_sample_lands_near_its_class(toy_gmm: GaussianMixture) -> None:
    """At sigma -> 0 the denoiser is the identity; at large sigma it returns the (class) mean."""
    x = _points(toy_gmm, 0.0, count=3)
    torch.testing.assert_close(toy_gmm(x, 1e-6), x, rtol=0, atol=1e-9)
    far = torch.zeros(2, 2, dtype=torch.float64)
    torch.testing.assert_close(
        toy_gmm(far, 1e4, class_labels=torch.tensor([0, 1])), toy_gmm.means, rtol=0, atol=1e-6
    )


# --- fitting --------------------------------------------------------------------------------------


def test_fit_on_digits(digits: tuple[torch.Tensor, torch.Tensor], digits_gmm: GaussianMixture) -> None:
    images, labels = digits
    gmm = digits_gmm
    assert gmm.image_shape == (1, 8, 8) and gmm.dim == 64 and gmm.rank == 8
    assert gmm.num_classes == 10
    assert gmm.means.shape == (20, 64)
    assert torch.equal(torch.bincount(gmm.labels), torch.full((10,), 2))
    # bases are orthonormal, variances sorted and floored
    gram = torch.einsum("kdr,kds->krs", gmm.bases, gmm.bases)
    torch.testing.assert_close(gram, torch.eye(8, dtype=torch.float64).expand(20, 8, 8), rtol=0, atol=1e-10)
    assert bool((gmm.var_top[:, :-1] >= gmm.var_top[:, 1:]).all())
    assert bool((gmm.var_top >= 1e-4).all()) and bool((gmm.var_rest >= 1e-4).all())
    # k-means splits each class, so per class the weights are the class frequency and the
    # weighted component means are the class mean
    weights = gmm.log_weights.exp()
    flat = images.reshape(len(images), -1)
    for c in range(10):
        members = gmm.labels == c
        # (rel_tol 1e-6: ``fit`` passes the weights through float32, see the report)
        assert math.isclose(float(weights[members].sum()), float((labels == c).double().mean()), rel_tol=1e-6)
        class_mean = (weights[members, None] * gmm.means[members]).sum(0) / weights[members].sum()
        torch.testing.assert_close(class_mean, flat[labels == c].mean(0), rtol=0, atol=1e-7)
    # the density prefers digits to uniform noise by a wide margin, and classifies well
    noise = torch.rand(len(images), 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    train_ll, noise_ll = gmm.log_prob(images), gmm.log_prob(noise * 2 - 1)
    assert float(train_ll.mean()) > float(noise_ll.mean()) + 50
    assert float((train_ll > noise_ll.max()).double().mean()) > 0.99
    accuracy = (gmm.class_log_posterior(images, 0.0).argmax(1) == labels).double().mean()
    assert float(accuracy) > 0.9


def test_full_rank_single_component_fit_is_the_sample_covariance(digits) -> None:
    images, labels = digits
    chosen = images[labels == 3].reshape(-1, 64)
    gmm = GaussianMixture.fit(chosen, rank=64, min_variance=1e-12)
    cov = torch.from_numpy(dense_covariances(gmm)[0])
    expected = torch.cov(chosen.T)
    torch.testing.assert_close(cov, expected, rtol=0, atol=1e-11)  # eigenvalues floored at 1e-12
    torch.testing.assert_close(gmm.means[0], chosen.mean(0), rtol=0, atol=1e-12)


def test_fit_errors() -> None:
    data = torch.randn(10, 4, dtype=torch.float64)
    with pytest.raises(UserError, match="gmm.rank"):
        GaussianMixture.fit(data, rank=0)
    with pytest.raises(UserError, match="gmm.components_per_class"):
        GaussianMixture.fit(data, components_per_class=0)
    with pytest.raises(UserError, match="fewer than 2"):
        GaussianMixture.fit(data[:1])
    with pytest.raises(UserError, match="dataset.mixture"):
        GaussianMixture.toy("spiral")


def test_fit_with_a_cluster_smaller_than_the_rank_pads_without_changing_its_covariance() -> None:
    from fastsample.models.gmm import _pad_basis, _pca

    generator = torch.Generator().manual_seed(0)
    data = torch.randn(40, 1, 8, 8, generator=generator, dtype=torch.float64)
    labels = torch.tensor([0] * 34 + [1] * 6)  # class 1: 6 points, rank 16
    mixture = GaussianMixture.fit(data, labels, rank=16, components_per_class=1)
    assert mixture.bases.shape == (2, 64, 16)

    def covariance(basis, top, rest):
        projector = basis @ basis.T
        return basis @ torch.diag(top) @ basis.T + rest * (torch.eye(64, dtype=basis.dtype) - projector)

    small = data[labels == 1].reshape(6, -1)
    _, basis, top, rest = _pca(small, 6, 1e-4)  # the cluster's own (6-dimensional) fit
    padded_basis, padded_top = _pad_basis(basis, top, rest, 16)
    assert torch.allclose(padded_basis.T @ padded_basis, torch.eye(16, dtype=torch.float64), atol=1e-12)
    padded = covariance(padded_basis, padded_top, rest)
    assert torch.allclose(padded, covariance(basis, top, rest), atol=1e-12)
