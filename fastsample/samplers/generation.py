"""Generating one batch of seeds: per-seed noise, the guidance task's setup, the sampler, decoding.

Every path that turns seeds into images (``sample.py``, ``evaluate.py mode=generate``, the FID
callback, schedule search, the benchmarks) goes through :func:`generate_batch`, so the same seeds
give the same images whichever job asks.
"""

from __future__ import annotations

from typing import Any

import torch

from fastsample.guidance import GuidanceTask
from fastsample.samplers.sampler import Sampler
from fastsample.utils.seeding import SeedNoise


def generate_batch(
    sampler: Sampler,
    model: Any,
    seeds: list[int],
    shape: tuple[int, ...],
    labels: torch.Tensor | None,
    guidance: Any,
    device: torch.device,
) -> torch.Tensor:
    """Sample one batch of seeds; noise and stochastic steps come from per-seed generators.

    A :class:`~fastsample.guidance.GuidanceTask` is set up for the batch (targets, measurements) and
    decides what is integrated; a plain callable is added to the ODE as ``g(x, sigma, denoised)``.
    """
    noise_source = SeedNoise(seeds)
    noise = noise_source.randn(shape, device=device)
    if isinstance(guidance, GuidanceTask):
        run = guidance.setup(model, seeds=seeds, labels=labels, shape=shape, device=device, dtype=noise.dtype)
        samples = sampler.sample(
            run.denoiser,
            noise,
            cond=run.cond,
            guidance=run.guidance,
            generator=noise_source,
            sigmas=sampler.sigmas(model),
        )
    else:
        cond = {"class_labels": labels.to(device)} if labels is not None else None
        samples = sampler.sample(model, noise, cond=cond, guidance=guidance, generator=noise_source)
    return decode_samples(model, samples)


def decode_samples(model: Any, samples: torch.Tensor) -> torch.Tensor:
    """Latent models (``model=diffusers_t2i``) decode their samples to images; others return them as is."""
    decode = getattr(model, "decode_latents", None)
    return samples if decode is None else decode(samples)
