"""Noise schedules: where a sampler's steps go. Each returns ``steps + 1`` descending sigmas ending at 0.

Schedules are separate from solvers (as in EDM / k-diffusion): any solver runs on any schedule,
including an explicit list (e.g. one found by schedule search).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fastsample.utils.errors import check_choice, check_range, fail

SCHEDULES = ("karras", "vp", "loglinear", "quadratic", "time_uniform", "explicit")
SPACINGS = ("leading", "trailing", "linspace")


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """EDM's schedule: uniform in ``sigma^(1/rho)`` from sigma_max to sigma_min (``steps`` points)."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def loglinear_sigmas(steps: int, sigma_min: float, sigma_max: float) -> Tensor:
    """Uniform in log-SNR (equivalently in log sigma)."""
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), steps, dtype=torch.float64).exp()


def vp_sigmas(
    steps: int, sigma_min: float, sigma_max: float, beta_d: float = 19.9, beta_min: float = 0.1
) -> Tensor:
    """Uniform in the continuous VP time of Song et al. (EDM's "VP" discretization)."""

    def t_of(sigma: float) -> float:
        return (math.sqrt(beta_min**2 + 2 * beta_d * math.log1p(sigma**2)) - beta_min) / beta_d

    t = torch.linspace(t_of(sigma_max), t_of(sigma_min), steps, dtype=torch.float64)
    return ((0.5 * beta_d * t**2 + beta_min * t).exp() - 1).sqrt()


def _table_t_range(table: Tensor, sigma_min: float, sigma_max: float) -> tuple[float, float]:
    """Fractional timesteps of ``sigma_min`` / ``sigma_max`` on an ascending sigma table."""
    log_table = table.double().log().numpy()
    positions = np.arange(len(log_table), dtype=np.float64)
    t_lo, t_hi = np.interp([math.log(sigma_min), math.log(sigma_max)], log_table, positions)
    return float(t_lo), float(t_hi)


def _table_sigma(table: Tensor, t: Tensor) -> Tensor:
    """Sigma at fractional timesteps ``t`` by log-linear interpolation of an ascending table."""
    log_table = table.double().log()
    low = t.floor().long().clamp(0, len(table) - 2)
    weight = (t - low).clamp(0, 1)
    return ((1 - weight) * log_table[low] + weight * log_table[low + 1]).exp()


def quadratic_sigmas(steps: int, sigma_min: float, sigma_max: float, table: Tensor) -> Tensor:
    """DDIM's quadratic spacing: timesteps uniform in sqrt(t) on the model's discrete table."""
    t_lo, t_hi = _table_t_range(table, sigma_min, sigma_max)
    ramp = torch.linspace(1, 0, steps, dtype=torch.float64) ** 2
    return _table_sigma(table, t_lo + (t_hi - t_lo) * ramp)


def time_uniform_sigmas(steps: int, table: Tensor, spacing: str = "leading") -> Tensor:
    """DDPM / DDIM respacing: ``steps`` integer timesteps of the table, spaced as diffusers does."""
    check_choice("sampler.schedule.spacing", spacing, SPACINGS)
    total = len(table)
    if steps > total:
        fail(f"sampler.steps={steps} exceeds the model's {total} training timesteps")
    if spacing == "leading":
        timesteps = torch.arange(steps) * (total // steps)
    elif spacing == "trailing":
        timesteps = (torch.arange(total, 0, -total / steps).round() - 1).long().flip(0)
    else:
        timesteps = torch.linspace(0, total - 1, steps).round().long()
    return table.double()[timesteps.flip(0)]


@dataclass
class ScheduleSpec:
    """Which schedule and its knobs; ``None`` sigma bounds take the model's trained range."""

    kind: str = "karras"
    rho: float = 7.0
    sigma_min: float | None = None
    sigma_max: float | None = None
    spacing: str = "leading"
    sigmas: list[float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def default_table() -> Tensor:
    """The linear-beta T=1000 DDPM sigma table, used for time-based schedules of continuous models."""
    from fastsample.diffusion.discrete import DiscreteSchedule

    return DiscreteSchedule().sigmas


def make_sigmas(spec: ScheduleSpec, steps: int, model: Any | None = None, append_zero: bool = True) -> Tensor:
    """Build the float64 sigma grid for ``steps`` steps: ``steps + 1`` values ending at 0.

    ``model`` supplies the trained sigma range (and the discrete table of discrete-time models);
    with ``append_zero=False`` the grid has ``steps + 1`` positive values ending at sigma_min.
    """
    check_choice("sampler.schedule.kind", spec.kind, SCHEDULES)
    if spec.kind == "explicit":
        return validate_sigmas(spec.sigmas, steps)
    check_range("sampler.steps", steps, low=1)
    sigma_min = spec.sigma_min if spec.sigma_min is not None else getattr(model, "sigma_min", 0.002)
    sigma_max = spec.sigma_max if spec.sigma_max is not None else getattr(model, "sigma_max", 80.0)
    check_range("sampler.schedule.sigma_min", sigma_min, low=0, low_inclusive=False)
    if sigma_min >= sigma_max:
        fail(f"sampler.schedule.sigma_min={sigma_min} must be below sigma_max={sigma_max}")
    points = steps if append_zero else steps + 1
    table = getattr(model, "discrete_sigmas", None)
    table = default_table() if table is None else table.detach().cpu()
    if spec.kind == "karras":
        check_range("sampler.schedule.rho", spec.rho, low=0, low_inclusive=False)
        sigmas = karras_sigmas(points, sigma_min, sigma_max, spec.rho)
    elif spec.kind == "loglinear":
        sigmas = loglinear_sigmas(points, sigma_min, sigma_max)
    elif spec.kind == "vp":
        sigmas = vp_sigmas(points, sigma_min, sigma_max, **spec.extra)
    elif spec.kind == "quadratic":
        sigmas = quadratic_sigmas(points, sigma_min, sigma_max, table)
    else:
        sigmas = time_uniform_sigmas(points, table, spec.spacing)
    if points == 1:
        sigmas = sigmas.new_tensor([sigma_max])
    return torch.cat([sigmas, sigmas.new_zeros(1)]) if append_zero else sigmas


def validate_sigmas(sigmas: Any, steps: int | None = None) -> Tensor:
    """Check an explicit grid: strictly decreasing, positive until a final 0, ``steps + 1`` long."""
    if sigmas is None:
        fail("sampler.schedule.sigmas must be given for schedule kind 'explicit'")
    grid = torch.as_tensor(list(sigmas), dtype=torch.float64)
    if grid.ndim != 1 or len(grid) < 2:
        fail("sampler.schedule.sigmas needs at least two values (start and 0)")
    if steps is not None and len(grid) != steps + 1:
        fail(f"sampler.schedule.sigmas has {len(grid)} values; {steps} steps need {steps + 1}")
    if float(grid[-1]) != 0.0:
        fail(f"sampler.schedule.sigmas must end at 0, got {float(grid[-1])}")
    if not bool((grid[:-1] > grid[1:]).all()):
        fail("sampler.schedule.sigmas must be strictly decreasing")
    return grid
