"""``sampler=diffusers``: a diffusers scheduler's sampling loop run on any fastsample denoiser.

The loop is the diffusers pipelines' loop::

    scheduler.set_timesteps(steps)
    latents = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents, t)
        latents = scheduler.step(unet(model_input, t), t, latents).prev_sample

with the UNet replaced by our denoiser. The mapping is exact for every scheduler of
:data:`~fastsample.models.diffusers_adapter.SCHEDULERS`:

* the scheduler is configured with the model's noise table: a diffusers model's own scheduler config,
  a discrete-VP model's table (``trained_betas``), or, for continuous (EDM) models, diffusers'
  default linear table (betas 1e-4 .. 0.02, T = 1000, which is also what fastsample's time-based
  schedules use for them);
* ``scale_model_input`` returns the VP state ``x_vp = x / sqrt(1 + sigma^2)``, at the table's
  ``sigma(t)`` (log-linear between entries, the inverse of diffusers' ``_sigma_to_t``); the denoiser
  is called with ``x = x_vp sqrt(1 + sigma(t)^2)`` at ``sigma(t)``, i.e. exactly where a diffusers
  UNet would see ``(model_input, t)``;
* its data prediction goes back as epsilon, ``(x - D) / sigma`` (the scheduler runs with
  ``prediction_type=epsilon``), which for an eps network is its own output again.

NFE is the number of timesteps the scheduler visits (one model call each: Heun / KDPM2 visit most
levels twice). The scheduler picks its own timesteps, so the sampler cannot follow another sigma grid
(restart intervals, trajectories, schedule search need a fastsample sampler); the sigma grid it
reports is where its steps land.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fastsample.diffusion.schedules import ScheduleSpec
from fastsample.models.diffusers_adapter import (
    build_scheduler,
    find_attribute,
    scheduler_class,
    scheduler_settings,
)
from fastsample.samplers.common import BoundModel, Callback, GuidanceFn, bind, report
from fastsample.samplers.registry import SamplerSpec
from fastsample.samplers.sampler import Sampler, _plain
from fastsample.utils.errors import check_choice, check_range, fail
from fastsample.utils.seeding import SeedNoise

#: schedulers that draw fresh noise at every step
STOCHASTIC = {
    "DDPMScheduler",
    "EulerAncestralDiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "DPMSolverSDEScheduler",
}
#: arguments of ``scheduler.step`` that the loop itself passes
LOOP_ARGUMENTS = {"self", "model_output", "timestep", "sample", "generator", "return_dict"}


# -- the model's scheduler --------------------------------------------------------------------------
def table_config(model: Any) -> dict[str, Any]:
    """The scheduler config that carries ``model``'s noise table (see the module docstring)."""
    config = find_attribute(model, "scheduler_config")
    if config is not None:
        return dict(config)
    table = find_attribute(model, "discrete_sigmas")
    if table is None:
        return {}
    abar = 1 / (1 + table.detach().double().cpu() ** 2)
    betas = 1 - abar / torch.cat([abar.new_ones(1), abar[:-1]])
    return {"num_train_timesteps": len(abar), "trained_betas": betas.tolist()}


def make_scheduler(
    model: Any,
    scheduler: str,
    scheduler_config: dict[str, Any] | None,
    steps: int,
    device: torch.device | str = "cpu",
) -> Any:
    """The named scheduler on ``model``'s table, with ``scheduler_config`` applied and ``steps`` set."""
    cls = scheduler_class(scheduler)
    config = {**table_config(model), **(scheduler_config or {}), "prediction_type": "epsilon"}
    instance = build_scheduler(cls, config, "sampler.scheduler_config")
    try:
        instance.set_timesteps(steps, device=device)
    except (ValueError, NotImplementedError) as err:
        fail(f"sampler.steps={steps}: {scheduler} refused it: {str(err).strip().splitlines()[0]}")
    return instance


def log_sigma_table(scheduler: Any) -> np.ndarray:
    """log sigma of the scheduler's ``alphas_cumprod``, per training timestep (float64)."""
    abar = scheduler.alphas_cumprod.detach().double().cpu()
    return ((1 - abar) / abar).sqrt().log().numpy()


def visited_sigmas(scheduler: Any) -> list[float]:
    """The sigma at which a diffusers UNet sees each timestep the scheduler visits (one model call each).

    Fractional timesteps are log-linear between table entries (the inverse of diffusers'
    ``_sigma_to_t`` and of :meth:`DiscreteSchedule.sigma_to_t`).
    """
    timesteps = scheduler.timesteps.detach().cpu().double().numpy()
    if getattr(scheduler.config, "timestep_type", None) == "continuous":
        return np.exp(4 * timesteps).tolist()  # EulerDiscreteScheduler's are log(sigma) / 4
    log_table = log_sigma_table(scheduler)
    return np.exp(np.interp(timesteps, np.arange(len(log_table)), log_table)).tolist()


def step_grid(scheduler: Any, steps: int) -> Tensor:
    """``steps + 1`` levels where the scheduler's steps land (every ``order``-th visited level), then 0."""
    levels = visited_sigmas(scheduler)[:: int(getattr(scheduler, "order", 1))]
    if len(levels) != steps:  # e.g. PNDM's Runge-Kutta warm-up visits extra levels
        levels = [levels[round(k)] for k in np.linspace(0, len(levels) - 1, steps)]
    return torch.tensor([*levels, 0.0], dtype=torch.float64)


def check_grid(scheduler: Any, sigmas: Tensor) -> None:
    """Refuse a sigma grid other than the scheduler's own (it cannot follow one)."""
    own = step_grid(scheduler, len(sigmas) - 1)
    given = sigmas.detach().double().cpu()
    if not torch.allclose(given, own, rtol=1e-5, atol=0):
        fail(
            f"sampler=diffusers runs {type(scheduler).__name__}'s own timesteps (sigmas "
            f"{float(own[0]):.4g} .. {float(own[-2]):.4g}); it cannot run on another grid "
            f"({float(given[0]):.4g} .. {float(given[-2]):.4g}): restart, trajectories and schedule "
            "search need a fastsample sampler"
        )


# -- the loop ---------------------------------------------------------------------------------------
def step_arguments(scheduler: Any, step_kwargs: dict[str, Any], generator: Any) -> dict[str, Any]:
    """Keyword arguments of ``scheduler.step``: the settings plus per-sample generators when it takes them."""
    kwargs = dict(step_kwargs)
    if generator is not None and "generator" in inspect.signature(scheduler.step).parameters:
        # diffusers draws row k from generator k: fastsample's per-seed streams carry over
        kwargs["generator"] = generator.generators if isinstance(generator, SeedNoise) else generator
    return kwargs


def to_latents(scheduler: Any, x: Tensor) -> Tensor:
    """A sigma-space state at the first timestep's level as the scheduler's latents."""
    t0 = scheduler.timesteps[0]
    sigma = visited_sigmas(scheduler)[0]
    scale = scheduler.scale_model_input(torch.ones_like(x[:1]), t0).flatten()[0]  # latents -> x_vp
    return x / math.sqrt(1 + sigma**2) / scale


def scheduler_loop(
    model: BoundModel,
    latents: Tensor,
    scheduler: Any,
    *,
    step_kwargs: dict[str, Any],
    generator: Any = None,
    callback: Callback | None = None,
) -> Tensor:
    """The diffusers pipeline loop with ``model`` (a bound denoiser) in the UNet's place.

    ``callback`` hears after every model call, with the state in sigma space at the next visited level
    (known once the scheduler has scaled it for the next call).
    """
    kwargs = step_arguments(scheduler, step_kwargs, generator)
    levels = visited_sigmas(scheduler)
    grid = torch.tensor([*levels, 0.0], dtype=torch.float64)
    pending: tuple[int, Tensor] | None = None
    for i, t in enumerate(scheduler.timesteps):
        sigma = levels[i]
        x = scheduler.scale_model_input(latents, t) * math.sqrt(1 + sigma**2)
        if pending is not None:
            report(callback, pending[0], grid, x, pending[1])
        denoised = model(x, x.new_tensor(sigma))
        latents = scheduler.step((x - denoised) / sigma, t, latents, **kwargs, return_dict=False)[0]
        pending = (i, denoised)
    if pending is not None:
        report(callback, pending[0], grid, latents, pending[1])
    return latents


def sample_diffusers(
    denoiser: Any,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: dict | None = None,
    guidance: GuidanceFn | None = None,
    generator: Any = None,
    callback: Callback | None = None,
    scheduler: str = "DDIMScheduler",
    scheduler_config: dict[str, Any] | None = None,
    step_kwargs: dict[str, Any] | None = None,
) -> Tensor:
    """Run ``scheduler`` for ``len(sigmas) - 1`` steps from ``x`` at ``sigmas[0]``.

    ``sigmas`` must be the scheduler's own grid (:meth:`DiffusersSampler.sigmas`).
    """
    instance = make_scheduler(denoiser, scheduler, scheduler_config, len(sigmas) - 1, x.device)
    check_grid(instance, sigmas)
    return scheduler_loop(
        bind(denoiser, cond, guidance),
        to_latents(instance, x),
        instance,
        step_kwargs=step_kwargs or {},
        generator=generator,
        callback=callback,
    )


# -- the config object ------------------------------------------------------------------------------
def count_timesteps(
    steps: int, *, scheduler: str, scheduler_config: dict[str, Any] | None = None, **_: Any
) -> int:
    """NFE: the timesteps the scheduler visits for ``steps`` with its default config (a model's own
    scheduler config can change the count: :attr:`DiffusersSampler.nfe` follows the model)."""
    return len(make_scheduler(None, scheduler, scheduler_config, steps).timesteps)


def check_mapping(setting: str, value: Any) -> dict[str, Any]:
    value = _plain(value)
    if value is None:
        return {}
    if not isinstance(value, dict):
        fail(f"{setting} must be a mapping of settings, got {value!r}")
    return value


class DiffusersSampler(Sampler):
    """``conf/sampler/diffusers.yaml``: any diffusers scheduler as a fastsample sampler.

    Args:
        scheduler: the scheduler class (DDIMScheduler, DPMSolverMultistepScheduler, ...).
        steps: ``num_inference_steps``.
        scheduler_config: settings updating the model's scheduler config (``timestep_spacing``,
            ``use_karras_sigmas``, ``solver_order``, ``clip_sample``, ...), checked against the class.
        step_kwargs: extra arguments of ``scheduler.step`` (e.g. ``{eta: 1.0}`` for DDIM).

    :meth:`sample` starts where the diffusers pipelines start, ``noise * init_noise_sigma`` in the
    scheduler's space; ``nfe`` counts the scheduler's timesteps (the model calls it makes).
    """

    def __init__(
        self,
        scheduler: str = "DDIMScheduler",
        steps: int = 10,
        scheduler_config: dict[str, Any] | None = None,
        step_kwargs: dict[str, Any] | None = None,
        name: str = "diffusers",
    ) -> None:
        check_choice("sampler.name", name, ("diffusers",))
        check_range("sampler.steps", steps, low=1)
        self.name, self.steps = name, int(steps)
        cls = scheduler_class(scheduler)
        overrides = check_mapping("sampler.scheduler_config", scheduler_config)
        self.check_settings(cls, overrides, check_mapping("sampler.step_kwargs", step_kwargs))
        self.schedule = ScheduleSpec(kind="diffusers")
        self.knobs = {
            "scheduler": scheduler,
            "scheduler_config": overrides,
            "step_kwargs": check_mapping("sampler.step_kwargs", step_kwargs),
        }
        stochastic = scheduler in STOCHASTIC or "sde" in str(overrides.get("algorithm_type", ""))
        stochastic |= float(self.knobs["step_kwargs"].get("eta", 0) or 0) > 0
        self.spec = SamplerSpec(
            name, sample_diffusers, nfe=count_timesteps, order=None, stochastic=stochastic
        )
        self._nfe = self.spec.count_nfe(self.steps, self.knobs)

    @staticmethod
    def check_settings(cls: type, overrides: dict[str, Any], step_kwargs: dict[str, Any]) -> None:
        """Refuse settings the scheduler class does not have, naming the allowed ones."""
        if "prediction_type" in overrides:
            fail(
                "sampler.scheduler_config.prediction_type is fixed: the denoiser's output reaches the "
                "scheduler as epsilon (the model's own prediction type is handled by the model)"
            )
        allowed = scheduler_settings(cls) - {"prediction_type"}
        for key in sorted(set(overrides) - allowed):
            fail(
                f"sampler.scheduler_config.{key} is not a setting of {cls.__name__}; "
                f"allowed: {', '.join(sorted(allowed))}"
            )
        allowed_step = set(inspect.signature(cls.step).parameters) - LOOP_ARGUMENTS
        for key in sorted(set(step_kwargs) - allowed_step):
            fail(
                f"sampler.step_kwargs.{key} is not an argument of {cls.__name__}.step; "
                f"allowed: {', '.join(sorted(allowed_step)) or 'none'}"
            )

    @property
    def nfe(self) -> int:
        """Model calls per batch: the timesteps the scheduler visits on the last model sampled (before
        any, on the default config; a model's config can change the count, e.g. PNDM's skip_prk_steps)."""
        return self._nfe

    def scheduler(self, model: Any, device: torch.device | str = "cpu") -> Any:
        """A fresh scheduler for ``model`` with this sampler's settings and steps (updates :attr:`nfe`)."""
        instance = make_scheduler(
            model, self.knobs["scheduler"], self.knobs["scheduler_config"], self.steps, device
        )
        self._nfe = len(instance.timesteps)
        return instance

    def sigmas(self, model: Any) -> Tensor:
        """Where the scheduler's steps land for ``model`` (``steps + 1`` levels ending at 0)."""
        return step_grid(self.scheduler(model), self.steps)

    # -- the hooks of BaseSampler: the scheduler steps its own latents ----------------------------
    def _sampling_sigmas(self, denoiser: Any, sigmas: Tensor | None) -> Tensor | None:
        # None: the scheduler's own timesteps, with no grid to check them against
        return sigmas

    def _start(
        self,
        denoiser: Any,
        noise: Tensor,
        sigmas: Tensor | None,
        *,
        cond: dict | None = None,
        generator: Any = None,
    ) -> Tensor:
        """The latents the diffusers pipelines start from: ``noise * init_noise_sigma``."""
        return noise * self.scheduler(denoiser, noise.device).init_noise_sigma

    def _enter(self, denoiser: Any, x: Tensor, sigmas: Tensor) -> Tensor:
        """A sigma-space state at ``sigmas[0]`` as the scheduler's latents."""
        return to_latents(self.scheduler(denoiser, x.device), x)

    def _integrate(
        self,
        denoiser: Any,
        x: Tensor,
        sigmas: Tensor | None,
        *,
        cond: dict | None,
        guidance: GuidanceFn | None,
        generator: Any,
        callback: Callback,
    ) -> Tensor:
        """The pipeline loop from latents ``x``; ``sigmas``, if given, must be :meth:`sigmas`' grid."""
        instance = self.scheduler(denoiser, x.device)
        if sigmas is not None:
            check_grid(instance, sigmas)
        return scheduler_loop(
            bind(denoiser, cond, guidance),
            x,
            instance,
            step_kwargs=self.knobs["step_kwargs"],
            generator=generator,
            callback=callback,
        )

    def __repr__(self) -> str:
        return f"DiffusersSampler({self.knobs['scheduler']!r}, steps={self.steps}, nfe={self.nfe})"
