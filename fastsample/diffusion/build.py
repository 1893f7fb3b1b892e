"""Wrap a raw network into a sigma-space denoiser according to its parametrization."""

from __future__ import annotations

from typing import Any

from torch import nn

from fastsample.diffusion.denoiser import Denoiser, EDMDenoiser
from fastsample.diffusion.discrete import DiscreteSchedule, DiscreteVPDenoiser
from fastsample.utils.errors import check_choice

PARAMETRIZATIONS = ("edm", "ddpm")


def wrap_network(
    net: nn.Module,
    parametrization: dict[str, Any],
    image_shape: tuple[int, ...] | None,
    num_classes: int | None,
) -> Denoiser:
    """``parametrization``: ``{kind: edm, sigma_data, sigma_min, sigma_max}`` or
    ``{kind: ddpm, prediction, beta_schedule, timesteps, timestep}``."""
    settings = dict(parametrization)
    kind = settings.pop("kind")
    check_choice("task.objective", kind, PARAMETRIZATIONS)
    if kind == "edm":
        return EDMDenoiser(net, image_shape=image_shape, num_classes=num_classes, **settings)
    schedule = DiscreteSchedule(settings.pop("beta_schedule", "linear"), settings.pop("timesteps", 1000))
    return DiscreteVPDenoiser(net, schedule, image_shape=image_shape, num_classes=num_classes, **settings)
