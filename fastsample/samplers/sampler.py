"""``Sampler``: a configured sampler (name, steps, schedule, knobs), what ``conf/sampler/*.yaml`` builds.

It validates its settings up front (unknown knob, steps < 1, bad schedule: one clear error each),
builds the sigma grid for a model and runs the registered function (the guarded ``sample`` / ``run``
of :class:`~fastsample.samplers.base.BaseSampler`); :func:`sample_trajectory` records the trajectory
at requested sigmas.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from omegaconf import Container, OmegaConf
from torch import Tensor

from fastsample.diffusion.schedules import ScheduleSpec, make_sigmas
from fastsample.samplers.base import BaseSampler
from fastsample.samplers.common import Callback, GuidanceFn
from fastsample.samplers.registry import SamplerSpec, get_sampler
from fastsample.utils.errors import check_range, fail


def _schedule_spec(schedule: ScheduleSpec | dict | str | None) -> ScheduleSpec:
    if schedule is None:
        return ScheduleSpec()
    if isinstance(schedule, str):
        return ScheduleSpec(kind=schedule)
    if isinstance(schedule, ScheduleSpec):
        return schedule
    known = set(ScheduleSpec.__dataclass_fields__) - {"extra"}
    settings = dict(schedule)
    extra = {k: settings.pop(k) for k in list(settings) if k not in known}
    return ScheduleSpec(**settings, extra=extra)


def _plain(value: Any) -> Any:
    """A knob from a Hydra config as plain Python (lists / dicts such as Restart's intervals)."""
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, Container) else value


class Sampler(BaseSampler):
    """A registry sampler bound to its settings; call :meth:`sample` with a denoiser and standard normal
    noise (:class:`~fastsample.samplers.base.BaseSampler` runs it; this class runs the registered function).
    """

    def __init__(
        self, name: str, steps: int, schedule: ScheduleSpec | dict | str | None = None, **knobs: Any
    ) -> None:
        self.spec: SamplerSpec = get_sampler(name)
        self.name = name
        check_range("sampler.steps", steps, low=1)
        self.steps = int(steps)
        self.schedule = _schedule_spec(schedule)
        allowed = self.spec.knobs()
        unknown = sorted(set(knobs) - set(allowed))
        if unknown:
            fail(
                f"sampler.{unknown[0]} is not a setting of sampler {name!r}; "
                f"allowed: {', '.join(sorted(allowed)) or 'none'}"
            )
        self.knobs = {**allowed, **{name: _plain(value) for name, value in knobs.items()}}
        self.spec.count_nfe(self.steps, self.knobs)  # knob-dependent cost rules check their knobs now

    @property
    def nfe(self) -> int:
        """Model calls for one batch with this step count and knobs, on the schedule's grid.

        The NFE rules count a grid ending at 0, whose last step is one call (the denoised estimate)
        in every solver; a grid ending at sigma_min (``final_sigmas_type``) has only full steps: the
        cost of ``steps + 1`` steps ending at 0, less that last call.
        """
        if getattr(self.schedule, "final_sigmas_type", "zero") == "sigma_min":
            return self.spec.count_nfe(self.steps + 1, self.solver_knobs) - 1
        return self.spec.count_nfe(self.steps, self.solver_knobs)

    def sigmas(self, model: Any) -> Tensor:
        """The float64 sigma grid for ``model``'s range."""
        return make_sigmas(self.schedule, self.steps, model)

    @property
    def solver_knobs(self) -> dict[str, Any]:
        """The settings passed to the registered sampler function (all knobs here)."""
        return self.knobs

    def _integrate(
        self,
        denoiser: Any,
        x: Tensor,
        sigmas: Tensor,
        *,
        cond: dict | None,
        guidance: GuidanceFn | None,
        generator: Any,
        callback: Callback,
    ) -> Tensor:
        """The registered function from ``x`` at ``sigmas[0]``, on a grid in the state's dtype / device."""
        sigmas = sigmas.to(device=x.device, dtype=x.dtype)
        return self.spec.fn(
            denoiser,
            x,
            sigmas,
            cond=cond,
            guidance=guidance,
            generator=generator,
            callback=callback,
            **self.solver_knobs,
        )

    def __repr__(self) -> str:
        return f"Sampler({self.name!r}, steps={self.steps}, schedule={self.schedule.kind!r}, nfe={self.nfe})"


def insert_sigmas(sigmas: Tensor, extra: Sequence[float], rtol: float = 1e-6) -> Tensor:
    """Merge ``extra`` levels into a descending grid (levels already present within rtol are kept once)."""
    merged = sorted({*sigmas.tolist(), *map(float, extra)}, reverse=True)
    unique = [merged[0]]
    for level in merged[1:]:
        if abs(level - unique[-1]) > rtol * max(abs(unique[-1]), 1e-12):
            unique.append(level)
    return torch.tensor(unique, dtype=sigmas.dtype)


def sample_trajectory(
    sampler: Sampler, denoiser: Any, x: Tensor, sigmas: Tensor, save_at: Sequence[float], **kwargs: Any
) -> tuple[Tensor, Tensor]:
    """Run ``sampler`` and return (final state, states at ``save_at``) with shape (M, B, ...).

    The requested levels are inserted into the grid, so the states are exact solver states rather
    than interpolations; levels outside the grid are an error.
    """
    low, high = float(sigmas[-1]), float(sigmas[0])
    for level in save_at:
        if not low <= level <= high:
            fail(f"trajectory level {level} is outside the sampling range [{low}, {high}]")
    grid = insert_sigmas(sigmas, save_at)
    # Record by position in the grid, not by value: float32 runs and near-duplicate levels would
    # otherwise miss the lookup.
    positions = [int((grid - float(level)).abs().argmin()) for level in save_at]
    states: dict[int, Tensor] = {}
    if 0 in positions:
        states[0] = x.detach().clone()

    def record(info: dict[str, Any]) -> None:
        if info["i"] + 1 in positions:
            states[info["i"] + 1] = info["x"].detach().clone()

    final = sampler.run(denoiser, x, grid, callback=record, **kwargs)
    return final, torch.stack([states[position] for position in positions])
