"""One setup for every job: a config becomes (device, precision, model, sampler, guidance, seeds,
labels, shape) here and nowhere else.

``sample.py``, ``evaluate.py mode=generate``, schedule search, the benchmarks and the distributed
paths all call :func:`plan`, and generate a batch of seeds through :meth:`Setup.generate`
(:func:`fastsample.samplers.generation.generate_batch`), so the same settings give the same samples
through every job (``tests/test_jobs.py`` checks it byte for byte).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig

from fastsample.diffusion.accel import NetworkOptions, apply_network_options
from fastsample.guidance import GuidanceTask
from fastsample.samplers import Sampler
from fastsample.samplers.generation import generate_batch
from fastsample.samplers.splitting import SPLITTING, check_conditional
from fastsample.utils.device import resolve_device
from fastsample.utils.errors import check_choice, fail
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
    return Setup(
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


def build_model(cfg: DictConfig, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Instantiate ``cfg.model`` (a :class:`fastsample.diffusion.Denoiser`) in eval mode on ``device``
    in ``dtype``, with the config's network speed options (``network_precision``, ``channels_last``,
    ``compile``)."""
    model = instantiate(cfg.model).to(device).eval()
    if dtype != torch.float32:
        model = model.to(dtype)
    return apply_network_options(model, NetworkOptions.from_config(cfg))


def build_guidance(cfg: DictConfig) -> Any:
    """The guidance of ``cfg.guidance``: a :class:`~fastsample.guidance.GuidanceTask` (conf/guidance),
    a plain ``g(x, sigma, denoised)`` callable, or ``None`` for ``guidance=none``."""
    node = cfg.get("guidance")
    if node is None or "_target_" not in node:
        return None
    return instantiate(node)


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
        fail("the model does not declare its data shape; set shape=[C,H,W]")
    return tuple(shape)


def describe_run(sampler: Sampler, model: Any, guidance: Any = None) -> dict[str, Any]:
    """What was sampled with what: recorded in run.json and in evaluation results."""
    description = {
        "sampler": sampler.name,
        "steps": sampler.steps,
        "nfe": sampler.nfe,
        "schedule": sampler.schedule.kind,
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
