"""Discrete-time DDPM schedules and the adapter that maps eps / x0 / v networks to sigma space.

A VP state ``x_vp = sqrt(abar) x0 + sqrt(1 - abar) eps`` is the sigma-space state
``x = x_vp / sqrt(abar)`` at ``sigma = sqrt((1 - abar) / abar)``. The network is trained on integer
timesteps ``t = 0 .. T-1``; a sampler asks for arbitrary sigmas, so sigma is mapped back to a
(fractional, by log-sigma interpolation, or nearest) timestep.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from fastsample.diffusion.denoiser import Denoiser, append_dims
from fastsample.utils.errors import check_choice, check_range

BETA_SCHEDULES = ("linear", "cosine")
PREDICTIONS = ("eps", "x0", "v")
TIMESTEP_MODES = ("continuous", "nearest")


def make_betas(
    kind: str = "linear", steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
) -> Tensor:
    """DDPM betas in float64: ``linear`` (Ho et al.) or ``cosine`` (Nichol & Dhariwal, s=0.008)."""
    check_choice("model.beta_schedule", kind, BETA_SCHEDULES)
    check_range("model.timesteps", steps, low=2)
    if kind == "linear":
        # Ho et al. scale the endpoints for T=1000; keep them as given for any T.
        return torch.linspace(beta_start, beta_end, steps, dtype=torch.float64)
    offset = 0.008
    t = torch.arange(steps + 1, dtype=torch.float64) / steps
    abar = torch.cos((t + offset) / (1 + offset) * math.pi / 2) ** 2
    return (1 - abar[1:] / abar[:-1]).clamp(max=0.999)


class DiscreteSchedule(nn.Module):
    """A discrete noise schedule: ``abar_t`` and ``sigma_t`` for ``t = 0 .. T-1`` (sigma ascending).

    Built from a beta schedule (``kind``, ``steps``, ``beta_start``, ``beta_end``) or, with ``abar``,
    from an explicit cumulative-alpha table.
    """

    def __init__(
        self,
        kind: str = "linear",
        steps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        abar: Tensor | None = None,
    ) -> None:
        super().__init__()
        if abar is None:
            abar = torch.cumprod(1 - make_betas(kind, steps, beta_start, beta_end), dim=0)
        else:  # a table made elsewhere (e.g. a diffusers scheduler's alphas_cumprod); ``kind`` labels it
            abar = torch.as_tensor(abar, dtype=torch.float64).reshape(-1)
            check_range("model.timesteps", len(abar), low=2)
            steps = len(abar)
        self.kind, self.steps = kind, steps
        self.register_buffer("abar", abar, persistent=False)
        self.register_buffer("sigmas", ((1 - abar) / abar).sqrt(), persistent=False)
        self.register_buffer("log_sigmas", self.sigmas.log(), persistent=False)

    def sigma_to_t(self, sigma: Tensor, mode: str = "continuous") -> Tensor:
        """Map sigmas to timesteps: fractional by log-sigma interpolation, or the nearest integer."""
        log_sigma = sigma.to(self.log_sigmas).log().clamp(self.log_sigmas[0], self.log_sigmas[-1])
        distances = log_sigma[:, None] - self.log_sigmas[None, :]
        if mode == "nearest":
            return distances.abs().argmin(dim=1).to(sigma.dtype)
        low = (distances >= 0).sum(dim=1).sub(1).clamp(0, self.steps - 2)
        low_value, high_value = self.log_sigmas[low], self.log_sigmas[low + 1]
        weight = ((low_value - log_sigma) / (low_value - high_value)).clamp(0, 1)
        return (low + weight).to(sigma.dtype)

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """Inverse of :meth:`sigma_to_t` (log-linear interpolation between table entries)."""
        t = t.to(self.log_sigmas).clamp(0, self.steps - 1)
        low = t.floor().long().clamp(max=self.steps - 2)
        weight = t - low
        return ((1 - weight) * self.log_sigmas[low] + weight * self.log_sigmas[low + 1]).exp()


class DiscreteVPDenoiser(Denoiser):
    """Wraps a discrete-time VP network ``net(x_vp, t, class_labels)`` predicting eps, x0 or v."""

    def __init__(
        self,
        net: nn.Module,
        schedule: DiscreteSchedule | None = None,
        prediction: str = "eps",
        timestep: str = "continuous",
        image_shape: tuple[int, ...] | None = None,
        num_classes: int | None = None,
        sigma_data: float = 0.5,
    ) -> None:
        super().__init__()
        check_choice("model.prediction", prediction, PREDICTIONS)
        check_choice("model.timestep", timestep, TIMESTEP_MODES)
        self.net = net
        self.schedule = schedule if schedule is not None else DiscreteSchedule()
        self.prediction, self.timestep = prediction, timestep
        self.image_shape = tuple(image_shape) if image_shape is not None else None
        self.num_classes = num_classes
        self.sigma_data = sigma_data
        self.sigma_min = float(self.schedule.sigmas[0])
        self.sigma_max = float(self.schedule.sigmas[-1])

    @property
    def discrete_sigmas(self) -> Tensor:  # type: ignore[override]
        return self.schedule.sigmas

    def denoise(self, x: Tensor, sigma: Tensor, class_labels: Tensor | None = None, **cond: Any) -> Tensor:
        s = append_dims(sigma, x.ndim)
        alpha = 1 / (s**2 + 1).sqrt()  # sqrt(abar): also the scale from sigma space to VP space
        t = self.schedule.sigma_to_t(sigma, self.timestep)
        out = self.net_output(x * alpha, t, class_labels=class_labels, **cond).to(x.dtype)
        if self.prediction == "eps":
            return x - s * out
        if self.prediction == "x0":
            return out
        return alpha * (alpha * x) - (s * alpha) * out  # v = alpha eps - sigma_vp x0

    def net_output(self, x_vp: Tensor, t: Tensor, class_labels: Tensor | None = None, **_: Any) -> Tensor:
        """The network's raw prediction at VP state ``x_vp`` and timestep ``t``.

        Subclasses override it to pass other conditions (e.g. text embeddings) to their network.
        """
        return self.net(x_vp, t, class_labels)

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "prediction": self.prediction, "schedule": self.schedule.kind}
