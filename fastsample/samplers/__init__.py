"""Samplers: pure functions ``sample_<name>(denoiser, x, sigmas, ...)`` and a registry by name."""

from fastsample.samplers import deis, ode, restart, sde, splitting, unipc  # noqa: F401  (registers the samplers)
from fastsample.samplers.registry import SAMPLERS, SamplerSpec, get_sampler, register
from fastsample.samplers.sampler import Sampler, insert_sigmas, sample_trajectory

__all__ = [
    "SAMPLERS",
    "Sampler",
    "SamplerSpec",
    "get_sampler",
    "insert_sigmas",
    "register",
    "sample_trajectory",
]
