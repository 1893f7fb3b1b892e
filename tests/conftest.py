"""Shared fixtures: analytic Gaussian mixtures (exact denoisers), the digits data and a tiny network.

The mixtures are the test oracle of the solver tests: their denoiser is exact, so a sampler can be
compared with a high-accuracy solution of the very same probability-flow ODE.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastsample.diffusion import EDMDenoiser
from fastsample.models.gmm import GaussianMixture


@pytest.fixture(scope="module")
def single_thread():
    """Run a test module with one intra-op thread (restored afterwards).

    The solver tests evaluate tiny tensors thousands of times; extra threads only add
    synchronisation, and on a busy 2-core machine they make such tests several times slower.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def toy_gmm() -> GaussianMixture:
    """Two anisotropic 2-D Gaussians (one per class), float64, trained range [0.02, 80]."""
    return GaussianMixture.toy("two_blobs", sigma_min=0.02, sigma_max=80.0)


@pytest.fixture(scope="session")
def ring_gmm() -> GaussianMixture:
    """Eight narrow Gaussians on a circle of radius 2 (std 0.1): sharp modes for distribution tests."""
    return GaussianMixture.toy("ring")


@pytest.fixture(scope="session")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's bundled 8x8 digits as (N, 1, 8, 8) float64 images in [-1, 1] and their labels."""
    datasets = pytest.importorskip("sklearn.datasets")
    bunch = datasets.load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float64)[:, None] / 8.0 - 1.0
    return images, torch.tensor(bunch.target, dtype=torch.long)


@pytest.fixture(scope="session")
def digits_gmm(digits: tuple[torch.Tensor, torch.Tensor]) -> GaussianMixture:
    """A low-rank class-conditional mixture fitted to the digits: rank 8, 2 components per class."""
    images, labels = digits
    return GaussianMixture.fit(images, labels, rank=8, components_per_class=2, sigma_min=0.02, sigma_max=80.0)


class TinyNet(nn.Module):
    """A small conv net with the raw-network signature ``net(x, noise_labels, class_labels)``."""

    def __init__(self, channels: int = 1, width: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(channels, width, 3, padding=1)
        self.conv_out = nn.Conv2d(width, channels, 3, padding=1)
        self.noise_embed = nn.Linear(1, width)
        self.class_embed = nn.Embedding(num_classes + 1, width)  # last index: the null label
        self.num_classes = num_classes

    def forward(
        self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        noise_labels = torch.as_tensor(noise_labels, dtype=x.dtype, device=x.device).reshape(-1, 1)
        emb = self.noise_embed(noise_labels.expand(x.shape[0], 1))
        if class_labels is not None:
            emb = emb + self.class_embed(class_labels.long().clamp(0, self.num_classes))
        hidden = torch.tanh(self.conv_in(x) + emb[:, :, None, None])
        return self.conv_out(hidden)


def make_tiny_net_denoiser(dtype: torch.dtype = torch.float32, seed: int = 0) -> EDMDenoiser:
    """An EDM-preconditioned :class:`TinyNet` on (1, 8, 8) images with deterministic weights."""
    torch.manual_seed(seed)
    net = TinyNet().to(dtype)
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.mul_(1.5)
    return EDMDenoiser(net, sigma_data=0.5, image_shape=(1, 8, 8), num_classes=10)


@pytest.fixture()
def tiny_net_denoiser() -> EDMDenoiser:
    """A fresh float32 tiny EDM denoiser (fresh per test: tests may accumulate gradients in it)."""
    return make_tiny_net_denoiser()


@pytest.fixture()
def tiny_net_factory():
    """:func:`make_tiny_net_denoiser` itself, for tests that need another dtype or several copies."""
    return make_tiny_net_denoiser
