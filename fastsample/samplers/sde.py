"""Stochastic samplers: ancestral DDPM / DDIM(eta) / Euler ancestral, and DPM-Solver++(2M) SDE.

Noise comes from ``generator`` (a :class:`fastsample.utils.seeding.SeedNoise` gives per-sample
streams, so results do not depend on the batch size).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fastsample.samplers.common import Callback, GuidanceFn, bind, report
from fastsample.samplers.registry import register
from fastsample.utils.errors import check_choice, check_range
from fastsample.utils.seeding import randn_like


def ancestral_split(sigma: Tensor, sigma_next: Tensor, eta: float) -> tuple[Tensor, Tensor]:
    """Split a step into a deterministic part to ``sigma_down`` and fresh noise of std ``sigma_up``.

    ``sigma_up = eta * sigma_next * sqrt(1 - sigma_next^2 / sigma^2)`` is exactly DDIM's
    ``sigma_t(eta)`` mapped to sigma space; eta = 1 is the DDPM posterior (ancestral sampling).
    """
    sigma_up = (eta * sigma_next * (1 - sigma_next**2 / sigma**2).clamp(min=0).sqrt()).clamp(max=sigma_next)
    sigma_down = (sigma_next**2 - sigma_up**2).clamp(min=0).sqrt()
    return sigma_down, sigma_up


@register("ddim", order=1, eta=0.0)
@register("ddpm", stochastic=True, eta=1.0)
@register("euler_ancestral", stochastic=True, eta=1.0)
def sample_ancestral(
    denoiser: Any,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: dict | None = None,
    guidance: GuidanceFn | None = None,
    generator: Any = None,
    callback: Callback | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """DDIM with ``eta`` (eta = 0: the ODE / Euler; eta = 1: DDPM ancestral = Euler ancestral)."""
    check_range("sampler.eta", eta, low=0)
    model = bind(denoiser, cond, guidance)
    levels = sigmas.tolist()
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        if levels[i + 1] == 0:
            x = denoised
        else:
            sigma_down, sigma_up = ancestral_split(sigmas[i], sigmas[i + 1], eta)
            x = denoised + (sigma_down / sigmas[i]) * (x - denoised)
            if eta > 0:
                x = x + randn_like(x, generator) * s_noise * sigma_up
        report(callback, i, sigmas, x, denoised)
    return x


@register("dpmpp_2m_sde", stochastic=True)
def sample_dpmpp_2m_sde(
    denoiser: Any,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: dict | None = None,
    guidance: GuidanceFn | None = None,
    generator: Any = None,
    callback: Callback | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    solver_type: str = "midpoint",
) -> Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022): the 2M update with ``eta``-scaled noise injection."""
    check_range("sampler.eta", eta, low=0)
    check_choice("sampler.solver_type", solver_type, ("midpoint", "heun"))
    model = bind(denoiser, cond, guidance)
    levels = sigmas.tolist()
    previous: Tensor | None = None
    h_last: Tensor | None = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        if levels[i + 1] == 0:
            x = denoised
        else:
            h = sigmas[i].log() - sigmas[i + 1].log()
            eta_h = eta * h
            x = (sigmas[i + 1] / sigmas[i]) * (-eta_h).exp() * x - torch.expm1(-h - eta_h) * denoised
            if previous is not None:
                difference = (denoised - previous) * (h / h_last)
                if solver_type == "heun":
                    x = x + (-torch.expm1(-h - eta_h) / (-h - eta_h) + 1) * difference
                else:
                    x = x - 0.5 * torch.expm1(-h - eta_h) * difference
            if eta > 0:
                noise_std = sigmas[i + 1] * (-torch.expm1(-2 * eta_h)).sqrt() * s_noise
                x = x + randn_like(x, generator) * noise_std
            h_last = h
        previous = denoised
        report(callback, i, sigmas, x, denoised)
    return x
