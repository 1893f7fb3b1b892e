"""ES-DDPM (Lyu et al. 2022): early-stopped diffusion started from a diffused generator sample.

Algorithm: draw ``x0' ~ G`` from a cheap generator prior (VAE, GAN samples, a mixture), diffuse it to
step ``T'`` with the forward kernel, run the reverse process from ``T'`` to 0 with any sampler of the
registry (ancestral respaced DDPM, DDIM, or any ODE / SDE solver). NFE = the solver's NFE for the
step count on the truncated grid; drawing the prior costs no diffusion-model call.

Sigma space. The VP forward kernel ``x_vp = sqrt(abar) x0' + sqrt(1 - abar) eps`` is, in the
sigma-space state ``x = x_vp / sqrt(abar)`` that every denoiser of this package takes,
``x = x0' + sigma(T') eps`` with ``sigma = sqrt((1 - abar) / abar)`` (:func:`diffuse`); the
``1 / sqrt(abar)`` scaling is what the denoiser wrappers absorb (``DiscreteVPDenoiser`` multiplies
by ``sqrt(abar) = 1 / sqrt(1 + sigma^2)`` before calling the network). So the whole method is: start
the solver at ``sigmas[0] = sigma(T')`` from ``x0' + sigma(T') eps`` instead of ``sigma_max * eps``.

What T' means. ``T'`` (an integer in (0, T]) is a step of the model's discrete schedule:
``sigma(T') = table[T' - 1]`` for ``table`` = the model's ascending sigma table (``discrete_sigmas``;
T = its length). Continuous (EDM) models have no table; there ``T'`` is read on the DDPM linear-beta
T = 1000 table, so that ``T'`` means the same noise level for the shipped EDM model and a linear
DDPM model (T' = 100: sigma 0.339; 200: 0.719; 400: 2.03; 1000: 157). ``sigma_start`` gives the
level directly instead (continuous schedules only).

The step grid. ``schedule.kind=time_uniform`` respaces the truncated chain on integer timesteps
``T'-1 .. 0`` (``linspace``, both ends included, as improved-diffusion's respacing; or
``trailing``), then 0; with ``T' = T`` this is exactly the ordinary sampler's
``time_uniform`` grid of the same spacing. Every other kind (karras, loglinear, quadratic, vp) runs
from ``sigma(T')`` down to the model's ``sigma_min`` (the schedule's ``sigma_max`` is set to
``sigma(T')``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import Tensor

from fastsample.diffusion.schedules import ScheduleSpec, default_table, make_sigmas, validate_sigmas
from fastsample.samplers.common import Callback, GuidanceFn
from fastsample.samplers.priors import Generator, as_generator
from fastsample.samplers.registry import SAMPLERS, get_sampler
from fastsample.samplers.sampler import Sampler
from fastsample.utils.errors import check_choice, check_range, fail

TRUNCATED_SPACINGS = ("linspace", "trailing")
CONTINUOUS_KINDS = ("karras", "loglinear", "vp", "quadratic")


def diffuse(x0: Tensor, noise: Tensor, sigma: float | Tensor) -> Tensor:
    """The forward kernel ``q(x_T' | x0')`` in sigma space: ``x0' + sigma * eps``."""
    return x0 + noise * sigma


def sigma_table(model: Any) -> Tensor:
    """The model's ascending discrete sigma table, or the DDPM linear T=1000 table (continuous models)."""
    table = getattr(model, "discrete_sigmas", None)
    return default_table() if table is None else table.detach().cpu().double()


def check_t_prime(t_prime: Any, total: int | None = None) -> int:
    """``T'`` as an int in (0, T] (T unknown yet: only the lower bound and integrality are checked)."""
    upper = "T" if total is None else str(total)
    message = f"sampler.t_prime={t_prime!r} is out of range; allowed: an integer step in (0, {upper}]"
    if isinstance(t_prime, bool) or not isinstance(t_prime, (int, float)) or not math.isfinite(t_prime):
        fail(message)
    if not float(t_prime).is_integer() or t_prime <= 0 or (total is not None and t_prime > total):
        fail(message + (f" (the model has T = {total} training timesteps)" if total is not None else ""))
    return int(t_prime)


def t_prime_sigma(t_prime: int, table: Tensor) -> float:
    """``sigma(T') = table[T' - 1]``: the noise level of step ``T'`` (1-based, as in DDPM)."""
    return float(table[check_t_prime(t_prime, len(table)) - 1])


def truncated_timesteps(steps: int, t_prime: int, spacing: str = "linspace") -> Tensor:
    """``steps`` descending integer timesteps in ``[0, T' - 1]`` starting at ``T' - 1``.

    Written as :func:`fastsample.diffusion.schedules.time_uniform_sigmas` writes the full chain
    (``T' = T`` gives the same timesteps bit for bit).
    """
    check_choice("sampler.schedule.spacing", spacing, TRUNCATED_SPACINGS)
    if steps > t_prime:
        fail(
            f"sampler.steps={steps} exceeds sampler.t_prime={t_prime}: a time_uniform grid has at most one "
            "step per timestep; lower the steps or use a continuous schedule (karras, loglinear)"
        )
    if steps == 1:
        return torch.tensor([t_prime - 1])
    if spacing == "linspace":
        return torch.linspace(0, t_prime - 1, steps).round().long().flip(0)
    return (torch.arange(t_prime, 0, -t_prime / steps).round() - 1).long()


def sample_es_ddpm(
    denoiser: Any,
    x0: Tensor,
    noise: Tensor,
    sigmas: Tensor,
    *,
    solver: str = "ddpm",
    cond: dict | None = None,
    guidance: GuidanceFn | None = None,
    generator: Any = None,
    callback: Callback | None = None,
    **solver_knobs: Any,
) -> Tensor:
    """ES-DDPM as a pure function: diffuse ``x0'`` to ``sigmas[0]`` with ``noise``, then run ``solver``.

    ``solver`` is any registered sampler, run with its registry defaults updated by ``solver_knobs``.
    """
    spec = get_sampler(solver)
    knobs = {**spec.knobs(), **solver_knobs}
    x = diffuse(x0, noise, sigmas[0])
    return spec.fn(
        denoiser, x, sigmas, cond=cond, guidance=guidance, generator=generator, callback=callback, **knobs
    )


class ESDDPMSampler(Sampler):
    """``sampler=es_ddpm``: a registry ``solver`` run from ``sigma(T')`` on a diffused prior sample.

    Args:
        steps: the solver's steps on the truncated grid (NFE = the solver's NFE for ``steps``).
        schedule: the step schedule (``time_uniform``: respaced timesteps ``T'-1 .. 0``; continuous
            kinds: ``sigma(T') .. sigma_min``; ``explicit`` / ``file``: a grid starting at ``sigma(T')``).
        solver: any registered sampler (``ddpm``: ancestral, ``ddim``: eta = 0, ``heun``, ...).
        t_prime: the start step T' in (0, T] (see the module docstring for its sigma).
        sigma_start: the start level directly (continuous schedules; overrides ``t_prime``).
        prior: the generator: a :class:`~fastsample.samplers.priors.Generator`, a conf/prior config
            (built on first use, so configuring a missing prior costs nothing until sampling), a
            GaussianMixture or a ``.npz`` path.
        **knobs: the solver's own settings (``eta``, ``s_noise``, ...), validated against it.

    :meth:`sample` draws ``x0'`` per seed (or takes an edited ``x0``), diffuses it with the given
    standard normal noise and runs the solver; ``sigmas`` / ``run`` / ``nfe`` are the solver's on
    the truncated grid, so :func:`fastsample.samplers.generation.generate_batch`, the Evaluator and the
    benchmarks use it as any other sampler.
    """

    def __init__(
        self,
        name: str = "es_ddpm",
        steps: int = 100,
        schedule: ScheduleSpec | dict | str | None = None,
        *,
        solver: str = "ddpm",
        t_prime: int | None = 100,
        sigma_start: float | None = None,
        prior: Any = None,
        **knobs: Any,
    ) -> None:
        check_choice("sampler.name", name, ("es_ddpm",))
        if solver == name:
            fail("sampler.solver=es_ddpm is not allowed; choose a registry sampler (ddpm, ddim, heun, ...)")
        check_choice("sampler.solver", solver, sorted(SAMPLERS))
        super().__init__(
            solver, steps, schedule or ScheduleSpec(kind="time_uniform", spacing="linspace"), **knobs
        )
        self.name, self.solver = name, solver
        self._solver_knobs = dict(self.knobs)
        if sigma_start is None:
            if t_prime is None:
                fail(
                    "sampler.t_prime and sampler.sigma_start are both null; set one "
                    "(e.g. sampler.t_prime=100)"
                )
            self.t_prime: int | None = check_t_prime(t_prime)
            self.sigma_start: float | None = None
        else:
            check_range("sampler.sigma_start", sigma_start, low=0, low_inclusive=False)
            if self.schedule.kind == "time_uniform":
                fail(
                    "sampler.sigma_start needs a continuous schedule "
                    "(sampler.schedule.kind=karras | loglinear | "
                    "vp | quadratic); time_uniform steps on integer timesteps: use sampler.t_prime"
                )
            self.t_prime, self.sigma_start = None, float(sigma_start)
        if self.schedule.kind == "time_uniform":
            check_choice("sampler.schedule.spacing", self.schedule.spacing, TRUNCATED_SPACINGS)
        if self.schedule.kind in CONTINUOUS_KINDS and self.schedule.sigma_max is not None:
            fail(
                "sampler.schedule.sigma_max is set by ES-DDPM's start level; leave it null and use "
                "sampler.t_prime or sampler.sigma_start"
            )
        self._prior_source = prior
        self._prior: Generator | None = prior if isinstance(prior, Generator) else None
        self.knobs = {
            **self._solver_knobs,
            "solver": solver,
            "t_prime": self.t_prime,
            "sigma_start": self.sigma_start,
            "prior": self._prior_summary(),
        }

    # -- the prior -------------------------------------------------------------------------------
    def _prior_summary(self) -> Any:
        if self._prior is not None:
            return self._prior.describe()
        source = self._prior_source
        target = source.get("_target_") if hasattr(source, "get") else None
        return {"target": target} if target else (None if source is None else str(source))

    @property
    def prior(self) -> Generator:
        """The generator prior (built from its config on first use)."""
        if self._prior is None:
            self._prior = as_generator(self._prior_source)
            self.knobs["prior"] = self._prior.describe()
        return self._prior

    def draw_prior(
        self,
        count: int,
        generator: Any = None,
        shape: tuple[int, ...] | None = None,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        class_labels: Tensor | None = None,
    ) -> Tensor:
        """``count`` prior samples ``x0'`` (per seed with a SeedNoise), checked against ``shape``."""
        prior = self.prior
        if shape is not None:
            prior.bind(shape)
        with torch.no_grad():
            x0 = prior.sample(count, generator, device=device, dtype=dtype, class_labels=class_labels)
        if shape is not None and tuple(x0.shape[1:]) != tuple(shape):
            fail(f"sampler.prior returned images of shape {tuple(x0.shape[1:])}, expected {tuple(shape)}")
        self.knobs["prior"] = prior.describe()
        return x0

    # -- the grid --------------------------------------------------------------------------------
    def start_sigma(self, model: Any) -> float:
        """``sigma(T')`` for ``model`` (or ``sigma_start``)."""
        if self.sigma_start is not None:
            return self.sigma_start
        return t_prime_sigma(self.t_prime, sigma_table(model))

    def sigmas(self, model: Any) -> Tensor:
        """The float64 truncated grid: ``steps + 1`` levels from ``sigma(T')`` to 0."""
        start = self.start_sigma(model)
        kind = self.schedule.kind
        if kind == "time_uniform":
            table = sigma_table(model)
            check_t_prime(self.t_prime, len(table))
            timesteps = truncated_timesteps(self.steps, self.t_prime, self.schedule.spacing)
            return torch.cat([table[timesteps], table.new_zeros(1)])
        if kind in ("explicit", "file"):
            grid = make_sigmas(self.schedule, self.steps, model)
            if not math.isclose(float(grid[0]), start, rel_tol=1e-6):
                fail(
                    f"sampler.schedule starts at sigma {float(grid[0]):.6g} but ES-DDPM starts at "
                    "sigma(T') = "
                    f"{start:.6g}; make the grid start there or set sampler.sigma_start={float(grid[0]):.6g}"
                )
            return validate_sigmas(grid, self.steps)
        sigma_min = (
            self.schedule.sigma_min
            if self.schedule.sigma_min is not None
            else getattr(model, "sigma_min", 0.002)
        )
        if start <= sigma_min:
            fail(
                f"the start level sigma(T') = {start:.4g} is not above the schedule's sigma_min "
                f"{sigma_min:.4g}; "
                "raise sampler.t_prime / sampler.sigma_start"
            )
        return make_sigmas(dataclasses.replace(self.schedule, sigma_max=start), self.steps, model)

    # -- running ---------------------------------------------------------------------------------
    #: ``sample(..., x0=edited)`` replaces the prior draw (latent interpolation, pastes, masks)
    start_options = ("x0",)

    @property
    def solver_knobs(self) -> dict[str, Any]:
        """The solver's own settings (``knobs`` also records the start level and the prior)."""
        return self._solver_knobs

    def _start(
        self,
        denoiser: Any,
        noise: Tensor,
        sigmas: Tensor,
        *,
        cond: dict | None = None,
        generator: Any = None,
        x0: Tensor | None = None,
    ) -> Tensor:
        """``x0' + sigma(T') * noise`` (ES-DDPM's start; the solver then runs from it to 0)."""
        labels = (cond or {}).get("class_labels")
        return self.start_state(noise, float(sigmas[0]), generator=generator, class_labels=labels, x0=x0)

    def start_state(
        self,
        noise: Tensor,
        sigma: float,
        *,
        generator: Any = None,
        class_labels: Tensor | None = None,
        x0: Tensor | None = None,
    ) -> Tensor:
        """``x_T' = x0' + sigma * noise`` with ``x0'`` drawn from the prior per seed (or the given ``x0``)."""
        if x0 is None:
            x0 = self.draw_prior(
                len(noise),
                generator,
                tuple(noise.shape[1:]),
                device=noise.device,
                dtype=noise.dtype,
                class_labels=class_labels,
            )
        elif tuple(x0.shape) != tuple(noise.shape):
            fail(f"x0 has shape {tuple(x0.shape)} but the noise has {tuple(noise.shape)}")
        return diffuse(x0.to(noise), noise, sigma)

    def __repr__(self) -> str:
        start = f"t_prime={self.t_prime}" if self.sigma_start is None else f"sigma_start={self.sigma_start}"
        return f"ESDDPMSampler(solver={self.solver!r}, steps={self.steps}, {start}, nfe={self.nfe})"
