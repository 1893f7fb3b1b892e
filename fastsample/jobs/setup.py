"""One setup for every job: a config becomes (device, precision, model, sampler, guidance, seeds,
labels, shape) here and nowhere else.

``sample.py``, ``evaluate.py mode=generate``, schedule search, the benchmarks and the distributed
paths all call :func:`plan`, and generate a batch of seeds through :meth:`Setup.generate`
(:func:`fastsample.samplers.generation.generate_batch`), so the same settings give the same samples
through every job (``tests/test_jobs.py`` checks it byte for byte).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig

from fastsample.diffusion.accel import NetworkOptions, apply_network_options
from fastsample.diffusion.schedules import ScheduleSpec
from fastsample.guidance import GuidanceTask
from fastsample.guidance.base import GuidanceBatch
from fastsample.samplers import Sampler
from fastsample.samplers.generation import generate_batch
from fastsample.samplers.restart import parse_restart_list, snap_to_grid
from fastsample.samplers.splitting import SPLITTING, check_conditional
from fastsample.utils.device import resolve_device
from fastsample.utils.errors import UserError, check_choice, fail
from fastsample.utils.instantiation import instantiate
from fastsample.utils.seeding import labels_for, parse_seeds

#: the run's arithmetic (noise, solver state, network): ``precision=<name>``
PRECISIONS = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class Setup:
    """What a job samples with, built once from the config by :func:`plan`."""

    device: torch.device
    dtype: torch.dtype
    model: torch.nn.Module
    sampler: Sampler
    guidance: Any
    shape: tuple[int, ...]
    seeds: list[int]
    batch_size: int
    class_labels: Any = None  # the config's ``class_labels`` (null, cycle or a class)

    def labels_for(self, seeds: Sequence[int]) -> torch.Tensor | None:
        """Class labels of ``seeds`` (per seed, so any subset gets the labels the full run gives it)."""
        return guidance_labels(self.class_labels, list(seeds), self.model, self.guidance)

    @property
    def labels(self) -> torch.Tensor | None:
        """The labels of all :attr:`seeds`."""
        return self.labels_for(self.seeds)

    @property
    def batches(self) -> list[list[int]]:
        """:attr:`seeds` cut into batches of :attr:`batch_size` (the unit of work and of shard files)."""
        return [self.seeds[i : i + self.batch_size] for i in range(0, len(self.seeds), self.batch_size)]

    def generate(self, seeds: Sequence[int], device: torch.device | None = None) -> torch.Tensor:
        """The samples of ``seeds`` (one batch), as every job generates them."""
        seeds = [int(seed) for seed in seeds]
        return generate_batch(
            self.sampler,
            self.model,
            seeds,
            self.shape,
            self.labels_for(seeds),
            self.guidance,
            device or self.device,
            self.dtype,
        )

    def score(
        self, evaluator: Any, seeds: Sequence[int] | None = None, on_batch: Any = None
    ) -> dict[str, float]:
        """Generate ``seeds`` (default: all) as :meth:`generate` does and score them on the fly with
        ``evaluator`` (a :class:`~fastsample.metrics.evaluator.Evaluator`); nothing is saved."""
        seeds = self.seeds if seeds is None else [int(seed) for seed in seeds]
        return evaluator.score_sampler(
            self.model,
            self.sampler,
            seeds,
            self.batch_size,
            shape=self.shape,
            class_labels=self.labels_for(seeds),
            guidance=self.guidance,
            device=self.device,
            on_batch=on_batch,
        )

    def describe(self) -> dict[str, Any]:
        """What was sampled with what (run.json, metrics.json)."""
        return describe_run(self.sampler, self.model, self.guidance)


def plan(cfg: DictConfig, *, seeds: Sequence[int] | None = None, device: torch.device | None = None) -> Setup:
    """Check the settings and build the :class:`Setup` of ``cfg`` (cheap checks before the model loads).

    ``seeds`` replaces ``cfg.seeds`` (schedule search samples its own seed sets); ``device`` replaces
    ``cfg.device`` (the distributed paths build on the CPU and let Lightning move the model).
    """
    check_choice("precision", cfg.get("precision", "float32"), tuple(PRECISIONS))
    seeds = list(seeds) if seeds is not None else parse_seeds(cfg.seeds)
    if not seeds:
        fail("seeds is empty; give e.g. seeds=0-63")
    batch_size = cfg.get("batch_size", 64)
    if batch_size < 1:
        fail(f"batch_size={batch_size} is not allowed; use a positive integer")
    device = device if device is not None else resolve_device(cfg.device)
    sampler: Sampler = instantiate(cfg.sampler)
    guidance = build_guidance(cfg)
    check_guidance(sampler, guidance)  # before the model: a refused combination fails at once
    dtype = PRECISIONS[cfg.get("precision", "float32")]
    model = build_model(cfg, device, dtype)
    guidance_precision(guidance, dtype)
    setup = Setup(
        device=device,
        dtype=dtype,
        model=model,
        sampler=sampler,
        guidance=guidance,
        shape=data_shape(cfg, model),
        seeds=seeds,
        batch_size=batch_size,
        class_labels=cfg.get("class_labels"),
    )
    preflight(setup)
    return setup


def preflight(setup: Setup) -> None:
    """The checks the first batch would make, made before a job writes anything: the sampler's grid for
    this model (a sigma range, ES-DDPM's T' beyond the model's T, Restart's t_max above the grid's
    start), an ES-DDPM prior's image shape (a
    bundle of another resolution), the guidance task's data checks (a mask of the wrong shape) and the
    class labels. A run refused here leaves its output folder as it was."""
    sigmas = setup.sampler.sigmas(setup.model)
    if setup.sampler.name == "restart":  # Restart's intervals against this model's grid (t_max <= start)
        for i, interval in enumerate(parse_restart_list(setup.sampler.knobs.get("restart_list"))):
            snap_to_grid(sigmas.tolist(), interval, f"sampler.restart_list[{i}]")
    bind = getattr(getattr(setup.sampler, "prior", None), "bind", None)
    if callable(bind):
        bind(setup.shape)
    first = setup.seeds[:1]
    setup.labels_for(first)
    if isinstance(setup.guidance, GuidanceTask):
        batch = GuidanceBatch(first, setup.shape, setup.device, setup.dtype)
        setup.guidance.prepare(setup.model, batch)


def build_model(cfg: DictConfig, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Instantiate ``cfg.model`` (a :class:`fastsample.diffusion.Denoiser`) in eval mode on ``device``
    in ``dtype``, with the config's network speed options (``network_precision``, ``channels_last``,
    ``compile``). The model records ``run_dtype``, so every path that samples it (the Evaluator, the
    FID callback) draws its noise in that precision."""
    model = instantiate_setting(cfg.model, "model").to(device).eval()
    if dtype != torch.float32:
        model = model.to(dtype)
        check_precision(model, dtype)
    model = apply_network_options(model, NetworkOptions.from_config(cfg))
    object.__setattr__(model, "run_dtype", dtype)  # a plain attribute (the wrapper may be an nn.Module)
    return model


def check_precision(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Refuse ``precision=float64`` for a model whose weights did not follow ``.to(dtype)`` (a wrapped
    network that keeps its own dtype would otherwise fail at its first call, or silently run float32)."""
    kept = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.is_floating_point()})
    if any(name != str(dtype).removeprefix("torch.") for name in kept):
        fail(
            f"precision={str(dtype).removeprefix('torch.')} is not supported by this model: its weights stay "
            f"{', '.join(kept)}; use precision=float32 (network_precision= sets the network's arithmetic)"
        )


def instantiate_setting(node: DictConfig, setting: str) -> Any:
    """:func:`instantiate` ``node``; a keyword the target does not take (``+model.model_channels=32``)
    becomes a UserError naming ``<setting>.<key>`` instead of a TypeError from deep inside the build."""
    try:
        return instantiate(node)
    except UserError:
        raise
    except Exception as err:  # a TypeError, or Hydra's InstantiationException around it
        key = unexpected_keyword(err)
        if key is None or key not in node:
            raise
        fail(f"{setting}.{key} is not a setting of {setting} ({node.get('_target_')}); remove it")


def unexpected_keyword(error: BaseException | None) -> str | None:
    """The keyword of an "unexpected keyword argument 'x'" TypeError in ``error``'s chain or message."""
    while error is not None:
        match = re.search(r"unexpected keyword argument '(\w+)'", str(error))
        if match:
            return match[1]
        error = error.__cause__ or error.__context__
    return None


def build_guidance(cfg: DictConfig) -> Any:
    """The guidance of ``cfg.guidance``: a :class:`~fastsample.guidance.GuidanceTask` (conf/guidance),
    a plain ``g(x, sigma, denoised)`` callable, or ``None`` for ``guidance=none``."""
    node = cfg.get("guidance")
    if node is None or "_target_" not in node:
        return None
    return instantiate(node)


def guidance_precision(guidance: Any, dtype: torch.dtype) -> None:
    """Networks a guidance task holds (a classifier) run in the run's precision, as the model does: a
    float32 classifier cannot take float64 states."""
    if dtype == torch.float32 or guidance is None:
        return
    for value in vars(guidance).values():
        if isinstance(value, torch.nn.Module):
            value.to(dtype)


def check_guidance(sampler: Sampler, guidance: Any) -> None:
    """Refuse sampler / guidance combinations that make no sense, before any sampling.

    Splitting samplers (ltsp, stsp) integrate a conditional function apart from the diffusion part:
    without guidance, or with a denoiser wrapper such as CFG, there is nothing to split.
    """
    if sampler.name not in SPLITTING:
        return
    if isinstance(guidance, GuidanceTask) and not guidance.conditional:
        fail(
            f"sampler={sampler.name} splits off a conditional function g, but guidance={guidance.name} is a "
            "denoiser wrapper with none; use a plain sampler (e.g. sampler=plms or dpmpp_2m) with it"
        )
    check_conditional(sampler.name, guidance)


def guidance_labels(mode: Any, seeds: list[int], model: Any, guidance: Any) -> torch.Tensor | None:
    """Class labels per seed: ``mode`` (``class_labels``); tasks that need targets default to ``cycle``."""
    if not isinstance(guidance, GuidanceTask) or not guidance.needs_labels:
        return labels_for(seeds, mode, getattr(model, "num_classes", None))
    return labels_for(seeds, "cycle" if mode is None else mode, guidance.num_classes(model))


def data_shape(cfg: DictConfig, model: Any) -> tuple[int, ...]:
    """The shape of one sample: the model's, or ``cfg.shape`` checked against it."""
    shape = getattr(model, "image_shape", None)
    if cfg.get("shape") is not None:
        requested = tuple(cfg.shape)
        if shape is not None and requested != tuple(shape):
            fail(f"shape={list(requested)} does not match the model's data shape {list(shape)}")
        shape = requested
    if shape is None:
        fail(
            "the model does not declare its data shape; set model.image_shape=[C,H,W] (model=callable) "
            "or shape=[C,H,W]"
        )
    return tuple(shape)


def schedule_settings(schedule: Any) -> dict[str, Any]:
    """The schedule's settings other than ``kind`` that differ from :class:`ScheduleSpec`'s defaults
    (spacing, convention, final level, bounds, ...): with ``kind`` they rebuild the grid. An explicit
    sigma list is left out (the sampler's grid is recorded with its samples)."""
    if not isinstance(schedule, ScheduleSpec):
        return {}
    default = ScheduleSpec()
    names = [item.name for item in dataclasses.fields(ScheduleSpec) if item.name not in ("kind", "sigmas")]
    return {
        name: getattr(schedule, name) for name in names if getattr(schedule, name) != getattr(default, name)
    }


def describe_run(sampler: Sampler, model: Any, guidance: Any = None) -> dict[str, Any]:
    """What was sampled with what: recorded in run.json and in evaluation results."""
    description = {
        "sampler": sampler.name,
        "steps": sampler.steps,
        "nfe": sampler.nfe,
        "schedule": sampler.schedule.kind,
        "schedule_settings": schedule_settings(sampler.schedule),
        "knobs": dict(sampler.knobs),
        "model": model.identity() if hasattr(model, "identity") else type(model).__name__,
    }
    if isinstance(guidance, GuidanceTask):
        description["guidance"] = guidance.describe()
    elif guidance is not None:
        description["guidance"] = {"name": type(guidance).__name__}
    if getattr(model, "network_options", None):
        description["network"] = dict(model.network_options)  # speed options that change the numerics
    return description
