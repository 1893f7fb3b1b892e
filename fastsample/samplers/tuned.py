"""Tuned samplers: the solver, knobs and sigma grid that ``sample.py mode=tune`` selected for a model,
saved as a YAML file and loaded back as a sampler.

A tuned-sampler file (format ``fastsample-tuned/1``) holds what is needed to run it (``solver``,
``knobs``, ``sigmas``, ``nfe``) and its provenance (model identity, the scores of every candidate,
the seeds and feature spaces that selected and judged it; see docs/tuning.md). Its ``sigmas`` and
``steps`` keys make it a schedule file as well, so ``sampler.schedule.kind=file`` can reuse just its
grid with another solver.

    sampler = fastsample.load_sampler("outputs/sample/<run>/tuned-nfe5.yaml")
    x0 = sampler.sample(denoiser, torch.randn(16, 1, 28, 28), cond={"class_labels": labels})

:class:`TunedSampler` is a :class:`~fastsample.samplers.base.BaseSampler`: it runs on any denoiser
``D(x, sigma, **cond)`` (the grid is explicit, so it does not depend on the model it is run on).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml
from torch import Tensor

from fastsample.diffusion.schedules import ScheduleSpec, validate_sigmas
from fastsample.samplers.base import BaseSampler
from fastsample.samplers.common import Callback, GuidanceFn
from fastsample.samplers.registry import SamplerSpec
from fastsample.samplers.sampler import Sampler
from fastsample.utils.errors import fail
from fastsample.utils.io import write_bytes_atomic

TUNED_FORMAT = "fastsample-tuned/1"
#: keys a tuned-sampler file must have to be run
REQUIRED = ("solver", "sigmas")


def tuned_grid(sigmas: Any, setting: str) -> tuple[Tensor, str]:
    """A stored grid, checked: descending, ending at 0, or at a positive sigma_min (a grid made with
    ``final_sigmas_type=sigma_min``, whose run ends on a slightly noisy state); returns the grid and
    which of the two it is."""
    try:
        values = [float(value) for value in sigmas]
    except (TypeError, ValueError):
        fail(f"{setting} must be a list of numbers, got {sigmas!r}")
    if values and values[-1] > 0:
        return validate_sigmas([*values, 0.0], setting=setting)[:-1], "sigma_min"
    return validate_sigmas(values, setting=setting), "zero"


class TunedSampler(BaseSampler):
    """A registry solver with its knobs on an explicit sigma grid (what the tuner selected).

    ``name`` is ``tuned``; ``knobs`` records the solver and its settings (run.json), ``nfe`` is the
    solver's own model-call count on the grid, ``schedule`` points at the file it came from.
    """

    def __init__(
        self, solver: str, sigmas: Any, knobs: dict[str, Any] | None = None, path: str | None = None
    ) -> None:
        grid, final = tuned_grid(sigmas, f"tuned sampler {path}" if path else "tuned sampler sigmas")
        steps = len(grid) - 1
        schedule = ScheduleSpec(kind="explicit", sigmas=grid.tolist(), final_sigmas_type=final)
        self.inner = Sampler(solver, steps, schedule, **(knobs or {}))
        self.grid = grid
        self.name = "tuned"
        self.steps = steps
        self.path = path
        self.schedule = ScheduleSpec(kind="file", path=path) if path else self.inner.schedule
        self.knobs = {"solver": solver, **self.inner.knobs}

    @property
    def solver(self) -> str:
        """The registry name of the solver that runs the grid."""
        return self.inner.name

    @property
    def spec(self) -> SamplerSpec:
        """The solver's registry entry (its order and stochasticity)."""
        return self.inner.spec

    @property
    def nfe(self) -> int:
        """Model calls of one batch: the solver's NFE rule on the grid."""
        return self.inner.nfe

    def sigmas(self, model: Any = None) -> Tensor:
        """The stored grid (float64, ending at 0 or sigma_min), whatever the model."""
        return self.grid.clone()

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
        **options: Any,
    ) -> Tensor:
        return self.inner._integrate(
            denoiser,
            x,
            sigmas,
            cond=cond,
            guidance=guidance,
            generator=generator,
            callback=callback,
            **options,
        )

    def __repr__(self) -> str:
        return f"TunedSampler({self.solver!r}, steps={self.steps}, nfe={self.nfe}, path={self.path!r})"


def read_tuned_file(path: str | os.PathLike) -> dict[str, Any]:
    """The content of a tuned-sampler file, checked for the keys that run it."""
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        fail(
            f"sampler.path={str(path)!r}: no such tuned-sampler file (python sample.py mode=tune writes one)"
        )
    try:
        content = yaml.safe_load(resolved.read_text())
    except (OSError, yaml.YAMLError) as err:
        fail(f"sampler.path={str(path)!r} is not a readable tuned-sampler file: {err}".splitlines()[0])
    if not isinstance(content, dict) or any(key not in content for key in REQUIRED):
        fail(f"sampler.path={str(path)!r} is not a tuned-sampler file: it needs {', '.join(REQUIRED)}")
    if content.get("format", TUNED_FORMAT) != TUNED_FORMAT:
        fail(
            f"sampler.path={str(path)!r} has format {content['format']!r}; this version reads {TUNED_FORMAT}"
        )
    return content


def load_sampler(path: str | os.PathLike, steps: int | None = None) -> TunedSampler:
    """A tuned-sampler file as a sampler (``conf/sampler/tuned.yaml``, ``fastsample.load_sampler``).

    ``steps`` (optional) must equal the file's step count: a config that asks for another is refused.
    """
    content = read_tuned_file(path)
    sampler = TunedSampler(content["solver"], content["sigmas"], content.get("knobs") or {}, path=str(path))
    if steps is not None and int(steps) != sampler.steps:
        fail(
            f"sampler.steps={steps} but the tuned sampler {path} has {sampler.steps} steps "
            f"(NFE {sampler.nfe}); drop sampler.steps or use a file tuned for that budget"
        )
    return sampler


def save_tuned_file(path: str | os.PathLike, content: dict[str, Any]) -> Path:
    """Write a tuned-sampler file atomically (YAML, keys in the given order, sigmas at full precision)."""
    path = Path(path)
    TunedSampler(content["solver"], content["sigmas"], content.get("knobs") or {})  # refuse what cannot run
    # through JSON: plain data only, and no YAML anchors where two entries share an object
    document = json.loads(json.dumps({"format": TUNED_FORMAT, **content}, default=str))
    text = yaml.safe_dump(document, sort_keys=False, default_flow_style=None, width=110)
    write_bytes_atomic(path, text.encode())
    return path
