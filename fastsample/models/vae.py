"""A small convolutional VAE: its decoder is a cheap generator prior for ES-DDPM.

Encoder: stride-2 convolutions down to a small feature map, then a linear layer to the posterior
mean and log-variance of a ``latent_dim`` Gaussian. Decoder: a linear layer back to that map, then
upsampling + convolutions to the exact image size (the sizes are recorded on the way down, so odd
sizes such as 28 -> 14 -> 7 -> 4 work too). Images are in [-1, 1]; the decoder returns the mean of a
Gaussian likelihood, unconstrained (the loss) or clamped to [-1, 1] (:meth:`ConvVAE.generate`).

Exported bundles (``train.py task=vae`` writes ``model.pt``) hold the network config and weights;
:func:`load_vae` rebuilds the network from one (a ``task=vae`` Lightning checkpoint loads through
:func:`fastsample.lit.loading.load_vae`, which also takes bundles).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fastsample.models.bundle import instantiate_net, load_weights, read_model_file
from fastsample.utils.errors import check_range, fail
from fastsample.utils.io import save_torch_atomic

VAE_FORMAT = "fastsample-vae-v1"


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(groups, channels), channels)


class ConvBlock(nn.Sequential):
    """conv 3x3 -> GroupNorm -> SiLU (``stride`` 2 halves the size, rounding up)."""

    def __init__(self, channels_in: int, channels_out: int, groups: int, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(channels_in, channels_out, 3, stride=stride, padding=1),
            _norm(channels_out, groups),
            nn.SiLU(),
        )


class ConvVAE(nn.Module):
    """Gaussian VAE over ``(in_channels, image_size, image_size)`` images with a ``latent_dim`` latent.

    ``channels`` are the widths of the downsampling levels (one stride-2 block each, followed by
    ``blocks_per_level`` stride-1 blocks); the decoder mirrors them (at each level its blocks, then
    upsampling to the next size up and a block to the next width), ending in a 3x3 conv to the
    image channels at full resolution.
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        latent_dim: int = 32,
        channels: Sequence[int] = (32, 64),
        blocks_per_level: int = 1,
        groups: int = 8,
    ) -> None:
        super().__init__()
        check_range("task.net.in_channels", in_channels, low=1)
        check_range("task.net.image_size", image_size, low=2)
        check_range("task.net.latent_dim", latent_dim, low=1)
        check_range("task.net.blocks_per_level", blocks_per_level, low=0)
        channels = [int(c) for c in channels]
        if not channels or min(channels) < 1:
            fail(f"task.net.channels={channels} must be a non-empty list of positive widths")
        self.in_channels, self.image_size, self.latent_dim = in_channels, image_size, latent_dim
        self.input_shape = (in_channels, image_size, image_size)
        sizes = [image_size]
        for _ in channels:
            sizes.append(math.ceil(sizes[-1] / 2))
        self.sizes = sizes  # spatial size at each level, input first
        bottom = channels[-1] * sizes[-1] ** 2

        layers: list[nn.Module] = []
        previous = in_channels
        for width in channels:
            layers.append(ConvBlock(previous, width, groups, stride=2))
            layers += [ConvBlock(width, width, groups) for _ in range(blocks_per_level)]
            previous = width
        self.encoder = nn.Sequential(*layers, nn.Flatten())
        self.to_posterior = nn.Linear(bottom, 2 * latent_dim)

        self.from_latent = nn.Linear(latent_dim, bottom)
        up: list[nn.Module] = [nn.SiLU()]
        for level in range(len(channels) - 1, -1, -1):  # bottom level first
            width, target = channels[level], sizes[level]
            up += [ConvBlock(width, width, groups) for _ in range(blocks_per_level)]
            out = channels[max(level - 1, 0)]
            up.append(nn.Upsample(size=(target, target), mode="nearest"))
            up.append(ConvBlock(width, out, groups))
        self.decoder = nn.Sequential(*up, nn.Conv2d(channels[0], in_channels, 3, padding=1))
        self.bottom_shape = (channels[-1], sizes[-1], sizes[-1])

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior mean and log-variance, each ``(B, latent_dim)``."""
        mean, log_var = self.to_posterior(self.encoder(x)).chunk(2, dim=1)
        return mean, log_var.clamp(-30.0, 20.0)

    def decode(self, z: Tensor) -> Tensor:
        """The decoder's mean image for latents ``z`` (unconstrained)."""
        hidden = self.from_latent(z).reshape(len(z), *self.bottom_shape)
        return self.decoder(hidden)

    def generate(self, z: Tensor) -> Tensor:
        """Images in [-1, 1] for latents ``z ~ N(0, I)``: the generator prior."""
        return self.decode(z).clamp(-1.0, 1.0)

    def forward(self, x: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Reconstruction (decoder mean), posterior mean and log-variance (reparametrized sample)."""
        mean, log_var = self.encode(x)
        noise = torch.randn_like(mean) if noise is None else noise
        z = mean + (0.5 * log_var).exp() * noise
        return self.decode(z), mean, log_var


def kl_to_standard_normal(mean: Tensor, log_var: Tensor) -> Tensor:
    """``KL(N(mean, exp(log_var)) || N(0, I))`` per example (summed over the latent)."""
    return 0.5 * (mean.pow(2) + log_var.exp() - 1.0 - log_var).sum(dim=1)


def gaussian_nll(x: Tensor, mean: Tensor, decoder_std: float | None) -> tuple[Tensor, Tensor]:
    """Per-example negative log-likelihood (summed over pixels, constant dropped) and the MSE.

    ``decoder_std=None`` uses the maximum-likelihood shared variance ``sigma^2 = MSE`` of the batch
    ("calibrated decoder", Rybkin et al. 2021): ``D/2 log(MSE)``, so reconstruction and KL are
    balanced without tuning a weight; a number fixes the decoder's standard deviation.
    """
    squared = (x - mean).pow(2).flatten(1)
    mse = squared.mean()
    dims = squared.shape[1]
    if decoder_std is None:
        variance = mse.detach().clamp(min=1e-6)
        nll = squared.sum(1) / (2 * variance) + 0.5 * dims * variance.log()
    else:
        nll = squared.sum(1) / (2 * decoder_std**2) + dims * math.log(decoder_std)
    return nll, mse


# -- bundles ----------------------------------------------------------------------------------------


def export_vae(module: Any, path: str | os.PathLike) -> Path:
    """Save a trained VAEModule's network (config + weights) as a VAE bundle at ``path`` (atomically)."""
    net = module.vae
    bundle = {
        "format": VAE_FORMAT,
        "net": dict(module.hparams.net),
        "image_shape": list(net.input_shape),
        "latent_dim": net.latent_dim,
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
    }
    save_torch_atomic(path, bundle)
    return Path(path)


def load_vae(path: str | os.PathLike, setting: str = "prior.path") -> ConvVAE:
    """A VAE bundle as an eval-mode, frozen :class:`ConvVAE`.

    Bundles only: a ``task=vae`` Lightning checkpoint loads with :func:`fastsample.lit.loading.load_vae`.
    """
    path = Path(path)
    return vae_from_content(read_model_file(path, setting), path, setting)


def vae_from_content(content: dict[str, Any], path: Path, setting: str) -> ConvVAE:
    """A frozen, eval-mode :class:`ConvVAE` from a VAE bundle's content."""
    kind = content.get("format")
    if kind is None:
        fail(
            f"{setting}={str(path)!r} is a Lightning checkpoint, not an exported bundle; "
            "load it with fastsample.lit.loading.load_vae"
        )
    if kind != VAE_FORMAT:
        fail(f"{setting}={str(path)!r} is a {kind} file, not a VAE; train one with train.py task=vae")
    net = instantiate_net(content, path, setting)
    load_weights(net, content["state_dict"], path, setting)
    return net.eval().requires_grad_(False)
