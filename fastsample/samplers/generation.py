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
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Sample one batch of seeds; noise and stochastic steps come from per-seed generators.

    ``dtype`` is the run's precision (``precision=float64``: noise, solver state and model); None takes
    the model's own floating dtype, so a model built in float64 is never fed float32 noise. The noise is
    drawn in float32 and cast, so float32 and float64 runs of a seed start from the same numbers.
    A :class:`~fastsample.guidance.GuidanceTask` is set up for the batch (targets, measurements) and
    decides what is integrated; a plain callable is added to the ODE as ``g(x, sigma, denoised)``.
    """
    noise_source = SeedNoise(seeds)
    noise = noise_source.randn(shape, dtype=dtype or model_dtype(model), device=device)
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


def model_dtype(model: Any) -> torch.dtype:
    """The dtype a model runs in: ``run_dtype`` (set by :func:`fastsample.jobs.setup.build_model` from
    ``precision``), else its first floating parameter's, else float32. Buffers do not count: analytic
    models keep float64 tables and compute in the state's dtype."""
    run_dtype = getattr(model, "run_dtype", None)
    if isinstance(run_dtype, torch.dtype):
        return run_dtype
    parameters = model.parameters() if isinstance(model, torch.nn.Module) else []
    return next((p.dtype for p in parameters if p.is_floating_point()), torch.float32)


def decode_samples(model: Any, samples: torch.Tensor) -> torch.Tensor:
    """Latent models (``model=diffusers_t2i``) decode their samples to images; others return them as is."""
    decode = getattr(model, "decode_latents", None)
    return samples if decode is None else decode(samples)
