"""Sigma-space core: the denoiser interface, parametrization adapters and noise schedules."""

from fastsample.diffusion.denoiser import CountingDenoiser, Denoiser, EDMDenoiser, FunctionDenoiser
from fastsample.diffusion.discrete import DiscreteSchedule, DiscreteVPDenoiser
from fastsample.diffusion.schedules import ScheduleSpec, make_sigmas

__all__ = [
    "CountingDenoiser",
    "Denoiser",
    "DiscreteSchedule",
    "DiscreteVPDenoiser",
    "EDMDenoiser",
    "FunctionDenoiser",
    "ScheduleSpec",
    "make_sigmas",
]
