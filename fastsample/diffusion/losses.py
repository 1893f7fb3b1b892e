"""Training objectives in plain PyTorch (the LightningModules only call these).

``edm``: EDM preconditioning, ``ln sigma ~ N(P_mean, P_std^2)``, weight ``(s^2 + sd^2) / (s sd)^2``.
``ddpm``: eps- (or v-) prediction on the discrete schedule, ``t ~ U{0..T'-1}``.
Both can restrict training to low noise levels (``t <= T'``, for ES-DDPM), which the EDM loss does
by sampling the log-normal truncated above ``sigma(T')`` (inverse CDF, so nothing is rejected).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastsample.diffusion.denoiser import append_dims
from fastsample.diffusion.discrete import DiscreteSchedule, DiscreteVPDenoiser


def truncated_lognormal(
    count: int,
    mean: float,
    std: float,
    upper: float | None,
    *,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Samples of ``exp(N(mean, std^2))`` conditioned to be <= ``upper`` (no truncation if None)."""
    normal = torch.distributions.Normal(0.0, 1.0)
    top = 1.0 if upper is None else float(normal.cdf(torch.tensor((math.log(upper) - mean) / std)))
    uniform = torch.rand(count, device=device, generator=generator).mul(top).clamp(1e-7, 1 - 1e-7)
    return (mean + std * normal.icdf(uniform)).exp()


def edm_loss(
    denoiser: torch.nn.Module,
    x0: Tensor,
    class_labels: Tensor | None = None,
    *,
    p_mean: float = -1.2,
    p_std: float = 1.2,
    sigma_data: float = 0.5,
    sigma_upper: float | None = None,
) -> Tensor:
    """EDM's weighted denoising loss (per example mean over pixels, then batch mean)."""
    sigma = truncated_lognormal(len(x0), p_mean, p_std, sigma_upper, device=x0.device)
    s = append_dims(sigma, x0.ndim)
    noisy = x0 + s * torch.randn_like(x0)
    weight = (s**2 + sigma_data**2) / (s * sigma_data) ** 2
    denoised = denoiser(noisy, sigma, class_labels=class_labels)
    return (weight * (denoised - x0) ** 2).mean()


def ddpm_loss(
    denoiser: DiscreteVPDenoiser,
    x0: Tensor,
    class_labels: Tensor | None = None,
    *,
    max_timestep: int | None = None,
) -> Tensor:
    """DDPM's simple loss on the network output (eps or v target; x0 for x0-prediction)."""
    schedule: DiscreteSchedule = denoiser.schedule
    limit = schedule.steps if max_timestep is None else max_timestep
    t = torch.randint(0, limit, (len(x0),), device=x0.device)
    abar = append_dims(schedule.abar.to(x0)[t], x0.ndim)
    eps = torch.randn_like(x0)
    noisy_vp = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    out = denoiser.net(noisy_vp, t.to(x0.dtype), class_labels)
    target = {"eps": eps, "x0": x0, "v": abar.sqrt() * eps - (1 - abar).sqrt() * x0}[denoiser.prediction]
    return ((out - target) ** 2).mean()
