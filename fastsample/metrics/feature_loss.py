"""Differentiable feature losses: KID between features of generated and real images, with gradients.

The DDSS objective (Watson et al., ICLR 2022; ``train.py task=ddss``, :mod:`fastsample.lit.ddss`) and
the quality schedule search (:mod:`fastsample.schedule_search.quality`) minimize the unbiased MMD^2
with the cubic kernel (KID, :func:`fastsample.metrics.mmd2_unbiased`) between features of samples and
of real data, differentiated through the sampler. The pieces, plain PyTorch (no Lightning):

* :func:`image_features`: an extractor's features of float samples, without the uint8 rounding that
  scoring applies (it has no gradient);
* :class:`RandomConvFeatures` / :func:`random_conv_features`: a fixed, seeded random CNN, a feature map
  no model was tuned on; :func:`pixel_features`: the identity;
* :func:`ddss_loss`: the objective on one batch, for any sampler that unrolls differentiably (the
  :class:`~fastsample.samplers.ggdm.GGDMSampler`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from fastsample.metrics.features import CleanFIDInception, FeatureExtractor, ModuleFeatures
from fastsample.metrics.scores import mmd2_unbiased
from fastsample.utils.errors import check_range, fail
from fastsample.utils.seeding import SeedNoise


class DifferentiableSampler(Protocol):
    """A sampler whose ``sample`` can run with gradients (``grad=True``) and checkpointed network calls,
    e.g. :class:`~fastsample.samplers.ggdm.GGDMSampler` (named by protocol: metrics sit below samplers)."""

    def sample(self, model: Any, noise: Tensor, **kwargs: Any) -> Tensor: ...


def image_features(extractor: FeatureExtractor, samples: Tensor) -> Tensor:
    """Features of float samples in [-1, 1] (``(N, C, H, W)`` or any data shape), differentiable.

    The same network as ``extractor(images)`` but without its uint8 rounding (which has no gradient):
    samples are clamped to [-1, 1] (what saving them does), mapped to the extractor's input range and
    embedded. clean-fid's Inception resizes with PIL outside the network and cannot be used here.
    """
    if isinstance(extractor, CleanFIDInception) and extractor.mode == "clean":
        fail(
            "the DDSS loss needs a differentiable feature network; clean-fid's Inception resizes with PIL. "
            "Use metrics mode=legacy_tensorflow, a classifier (features=classifier) or a module"
        )
    low, high = extractor.input_range
    x = samples.clamp(-1.0, 1.0)
    x = (x + 1.0) * ((high - low) / 2.0) + low
    if extractor.channels == 3 and x.ndim == 4 and x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    parameter = next(extractor.parameters(), None)
    if parameter is not None:
        x = x.to(parameter.dtype)
    features, _ = extractor.embed(x)
    return features.flatten(1)


class RandomConvFeatures(nn.Module):
    """A fixed, seeded random CNN: ``(N, C, H, W) -> (N, 2 * width * grid^2)`` features.

    Three 3x3 convolutions (the last two with stride 2) with tanh, average-pooled to a ``grid x grid``
    map. Random convolutional features keep spatial structure and need no training, which makes them a
    cheap feature map that no model was tuned on (held-out evaluation of DDSS, analytic mixtures).
    Weights come from their own generator, so the network is the same for a seed on any machine.
    """

    def __init__(self, in_channels: int = 1, width: int = 32, grid: int = 4, seed: int = 0) -> None:
        super().__init__()
        check_range("features.width", width, low=1)
        check_range("features.grid", grid, low=1)
        self.layers = nn.ModuleList(
            [
                nn.Conv2d(in_channels, width, 3, padding=1),
                nn.Conv2d(width, width, 3, stride=2, padding=1),
                nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            ]
        )
        self.grid = grid
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in self.layers:
                fan_in = layer.weight[0].numel()
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) / fan_in**0.5)
                layer.bias.copy_(0.1 * torch.randn(layer.bias.shape, generator=generator))
        self.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return nn.functional.adaptive_avg_pool2d(x, self.grid).flatten(1)


def ddss_loss(
    sampler: DifferentiableSampler,
    backbone: Any,
    features: Callable[[Tensor], Tensor],
    real: Tensor,
    seeds: Sequence[int],
    *,
    shape: Sequence[int] | None = None,
    class_labels: Tensor | None = None,
    checkpoint: bool = True,
) -> Tensor:
    """The DDSS objective on one batch: KID (unbiased MMD^2, cubic kernel) between ``features`` of the
    sampler's samples for ``seeds`` and of ``real``; differentiable in the sampler's parameters.

    The noise (initial and per step) comes from the seeds' own streams, so a batch of seeds is a fixed
    set of noise draws and the sample a deterministic function of the parameters (reparametrization).
    """
    noise_source = SeedNoise(seeds)
    noise = noise_source.randn(tuple(shape or real.shape[1:]), dtype=real.dtype, device=real.device)
    cond = {"class_labels": class_labels.to(real.device)} if class_labels is not None else None
    with torch.enable_grad():
        samples = sampler.sample(
            backbone, noise, cond=cond, generator=noise_source, grad=True, checkpoint=checkpoint
        )
        fake = features(samples)
    with torch.no_grad():
        target = features(real)
    return mmd2_unbiased(fake.double(), target.double())


def random_conv_features(
    in_channels: int = 1, width: int = 32, grid: int = 4, seed: int = 0
) -> ModuleFeatures:
    """:class:`RandomConvFeatures` as a feature extractor (named ``random_conv<seed>:<weights hash>``)."""
    return ModuleFeatures(RandomConvFeatures(in_channels, width, grid, seed), label=f"random_conv{seed}")


def pixel_features() -> ModuleFeatures:
    """The identity feature map (flattened pixels), named ``pixels``."""
    return ModuleFeatures(nn.Flatten(), label="pixels")
