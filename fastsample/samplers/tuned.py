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

import torch
import yaml
from torch import Tensor

from fastsample.diffusion.schedules import ScheduleSpec, validate_sigmas
from fastsample.samplers.base import BaseSampler
from fastsample.samplers.ggdm import GGDMSampler
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
    """A registry solver with its knobs on an explicit sigma grid (what the tuner selected), or a learned
    GGDM sampler (``solver="ggdm"``, its parameters in ``learned``; the grid is its learned levels).

    ``name`` is ``tuned``; ``knobs`` records the solver and its settings (run.json), ``nfe`` is the
    solver's own model-call count on the grid, ``schedule`` points at the file it came from.
    """

    def __init__(
        self,
        solver: str,
        sigmas: Any,
        knobs: dict[str, Any] | None = None,
        path: str | None = None,
        learned: dict[str, Any] | None = None,
    ) -> None:
        where = f"tuned sampler {path}" if path else "tuned sampler sigmas"
        grid, final = tuned_grid(sigmas, where)
        self.learned = learned
        if solver == GGDMSampler.name:
            self.inner = learned_ggdm(knobs or {}, learned, grid, where)
        else:
            schedule = ScheduleSpec(kind="explicit", sigmas=grid.tolist(), final_sigmas_type=final)
            self.inner = Sampler(solver, len(grid) - 1, schedule, **(knobs or {}))
        self.grid = grid
        self.name = "tuned"
        self.steps = len(grid) - 1
        self.path = path
        self.schedule = ScheduleSpec(kind="file", path=path) if path else self.inner.schedule
        self.knobs = {"solver": solver, **self.solver_knobs}

    @property
    def solver(self) -> str:
        """The registry name of the solver that runs the grid."""
        return self.inner.name

    @property
    def solver_knobs(self) -> dict[str, Any]:
        """The solver's settings, all of them (what the file's ``knobs`` holds to rebuild it)."""
        if isinstance(self.inner, GGDMSampler):
            return self.inner.settings()
        return dict(self.inner.knobs)

    @property
    def spec(self) -> SamplerSpec:
        """The solver's registry entry (its order and stochasticity)."""
        if isinstance(self.inner, GGDMSampler):
            fail("a learned GGDM tuned sampler has no registry solver; its levels are learned, not searched")
        return self.inner.spec

    @property
    def nfe(self) -> int:
        """Model calls of one batch: the solver's NFE rule on the grid."""
        return self.inner.nfe

    def sigmas(self, model: Any = None) -> Tensor:
        """The stored grid (float64, ending at 0 or sigma_min), whatever the model."""
        return self.grid.clone()

    def _integrate(self, denoiser: Any, x: Tensor, sigmas: Tensor, **settings: Any) -> Tensor:
        """The solver's own integration (cond, guidance, generator, callback and options as given)."""
        return self.inner._integrate(denoiser, x, sigmas, **settings)

    def __repr__(self) -> str:
        return f"TunedSampler({self.solver!r}, steps={self.steps}, nfe={self.nfe}, path={self.path!r})"


def learned_ggdm(
    knobs: dict[str, Any], learned: dict[str, Any] | None, grid: Tensor, where: str
) -> GGDMSampler:
    """The GGDM sampler of a tuned file: built from its settings (``knobs``) and initial grid, with the
    learned parameters loaded; its levels must be the file's ``sigmas``. Not bound to a backbone: like
    every tuned sampler it runs on any denoiser (the file names the model it was tuned for)."""
    if not learned or "init_sigmas" not in learned or "parameters" not in learned:
        fail(f"{where}: a 'ggdm' tuned sampler needs 'learned' with init_sigmas and parameters")
    sampler = GGDMSampler(learned["init_sigmas"], **knobs)
    state = {
        name: torch.as_tensor(values, dtype=torch.float64) for name, values in learned["parameters"].items()
    }
    state["init_sigmas"] = sampler.init_sigmas
    try:
        sampler.load_state_dict(state)
    except RuntimeError as err:
        fail(f"{where}: the learned GGDM parameters do not fit its settings ({str(err).splitlines()[0]})")
    levels = sampler.levels().detach()
    if levels.shape != grid.shape or not torch.allclose(levels, grid, rtol=1e-6, atol=0):
        fail(f"{where}: sigmas are not the learned GGDM levels {levels.tolist()}")
    return sampler.eval().requires_grad_(False)


def ggdm_learned_state(sampler: GGDMSampler) -> dict[str, Any]:
    """What a tuned file stores of a GGDM sampler besides its settings: the initial grid and the learned
    parameters, as plain lists at full precision."""
    parameters = {name: value.detach().cpu().tolist() for name, value in sampler.named_parameters()}
    return {"init_sigmas": sampler.init_sigmas.tolist(), "parameters": parameters}


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
    knobs, learned = content.get("knobs") or {}, content.get("learned")
    sampler = TunedSampler(content["solver"], content["sigmas"], knobs, path=str(path), learned=learned)
    if steps is not None and int(steps) != sampler.steps:
        fail(
            f"sampler.steps={steps} but the tuned sampler {path} has {sampler.steps} steps "
            f"(NFE {sampler.nfe}); drop sampler.steps or use a file tuned for that budget"
        )
    return sampler


def save_tuned_file(path: str | os.PathLike, content: dict[str, Any]) -> Path:
    """Write a tuned-sampler file atomically (YAML, keys in the given order, sigmas at full precision)."""
    path = Path(path)
    # refuse what cannot run
    TunedSampler(
        content["solver"], content["sigmas"], content.get("knobs") or {}, learned=content.get("learned")
    )
    # through JSON: plain data only, and no YAML anchors where two entries share an object
    document = json.loads(json.dumps({"format": TUNED_FORMAT, **content}, default=str))
    text = yaml.safe_dump(document, sort_keys=False, default_flow_style=None, width=110)
    write_bytes_atomic(path, text.encode())
    return path
