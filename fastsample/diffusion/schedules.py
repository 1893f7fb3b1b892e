"""Noise schedules: where a sampler's steps go. Each returns ``steps + 1`` descending sigmas ending at 0.

Schedules are separate from solvers (as in EDM / k-diffusion): any solver runs on any schedule,
including an explicit list or a schedule file (e.g. one found by schedule search,
:mod:`fastsample.schedule_search`): a YAML / JSON document with the sigmas and their provenance.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor

from fastsample.diffusion.discrete import DiscreteSchedule
from fastsample.utils.errors import check_choice, check_range, fail
from fastsample.utils.io import write_bytes_atomic

SCHEDULES = ("karras", "vp", "loglinear", "quadratic", "time_uniform", "explicit", "file")
SCHEDULE_FORMAT = "fastsample-schedule/1"
SPACINGS = ("leading", "trailing", "linspace")
#: how ``time_uniform`` counts its timesteps: as DDIM / PNDM (``steps`` points, t = 0 included by
#: 'leading' / 'linspace') or as diffusers' multistep schedulers (DPM-Solver, UniPC, DEIS: ``steps + 1``
#: points with t = 0 dropped, so no step is spent between sigma_min and the final level)
CONVENTIONS = ("ddim", "multistep")
#: the grid's last level: 0 (the last step returns the denoised estimate) or the schedule's sigma_min
#: (the run ends on a slightly noisy state, as diffusers' ``final_sigmas_type="sigma_min"``)
FINAL_SIGMAS = ("zero", "sigma_min")


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


def time_uniform_sigmas(
    steps: int, table: Tensor, spacing: str = "leading", convention: str = "ddim", offset: int = 0
) -> Tensor:
    """DDPM / DDIM respacing: ``steps`` integer timesteps of the table, spaced as diffusers does.

    ``convention="ddim"`` is DDIMScheduler's / PNDMScheduler's ``timestep_spacing``;
    ``convention="multistep"`` is that of DPMSolverMultistep / UniPCMultistep / DEISMultistep, which
    space ``steps + 1`` points and drop t = 0 ('trailing' is the same in both). ``offset`` is diffusers'
    ``steps_offset`` (added to 'leading' timesteps only, as diffusers does).
    """
    check_choice("sampler.schedule.spacing", spacing, SPACINGS)
    check_choice("sampler.schedule.convention", convention, CONVENTIONS)
    total = len(table)
    if steps + (convention == "multistep" and spacing != "trailing") > total:
        fail(f"sampler.steps={steps} exceeds the model's {total} training timesteps")
    if convention == "multistep":
        timesteps = torch.from_numpy(multistep_timesteps(steps, total, spacing, offset))
    elif spacing == "leading":
        timesteps = torch.arange(steps) * (total // steps) + offset
    elif spacing == "trailing":
        timesteps = (torch.arange(total, 0, -total / steps).round() - 1).long().flip(0)
    else:
        timesteps = torch.linspace(0, total - 1, steps).round().long()
    if int(timesteps.max()) >= total:
        fail(f"sampler.schedule.steps_offset={offset} puts a timestep past the model's last ({total - 1})")
    return table.double()[timesteps.flip(0)]


def multistep_timesteps(steps: int, total: int, spacing: str, offset: int = 0) -> np.ndarray:
    """Ascending timesteps of diffusers' multistep schedulers (their ``set_timesteps``, in numpy as there)."""
    if spacing == "linspace":
        timesteps = np.linspace(0, total - 1, steps + 1).round()[1:]
    elif spacing == "leading":
        timesteps = (np.arange(0, steps + 1) * (total // (steps + 1))).round()[1:] + offset
    else:
        timesteps = np.arange(total, 0, -total / steps).round()[::-1] - 1
    return timesteps.astype(np.int64)


@dataclass
class ScheduleSpec:
    """Which schedule and its knobs; ``None`` sigma bounds take the model's trained range."""

    kind: str = "karras"
    rho: float = 7.0
    sigma_min: float | None = None
    sigma_max: float | None = None
    spacing: str = "leading"
    #: time_uniform only: "ddim" | "multistep" (see :data:`CONVENTIONS`)
    convention: str = "ddim"
    #: time_uniform only: diffusers' ``steps_offset`` for 'leading' spacing
    steps_offset: int = 0
    #: "zero" | "sigma_min": the grid's last level (see :data:`FINAL_SIGMAS`)
    final_sigmas_type: str = "zero"
    sigmas: list[float] | None = None
    path: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def default_table() -> Tensor:
    """The linear-beta T=1000 DDPM sigma table, used for time-based schedules of continuous models."""

    return DiscreteSchedule().sigmas


def make_sigmas(spec: ScheduleSpec, steps: int, model: Any | None = None, append_zero: bool = True) -> Tensor:
    """Build the float64 sigma grid for ``steps`` steps: ``steps + 1`` values ending at 0.

    ``model`` supplies the trained sigma range (and the discrete table of discrete-time models);
    with ``append_zero=False`` the grid has ``steps + 1`` positive values ending at sigma_min.
    ``spec.final_sigmas_type="sigma_min"`` ends the grid at sigma_min instead of 0: the range kinds,
    which end there already, take ``steps + 1`` levels (as ``append_zero=False``); ``time_uniform``
    appends the table's lowest level to its ``steps`` timesteps, as diffusers does.
    """
    check_choice("sampler.schedule.kind", spec.kind, SCHEDULES)
    if spec.path is not None and spec.kind != "file":  # a file that is silently not used is worse
        fail(
            f"sampler.schedule.path={str(spec.path)!r} is set but sampler.schedule.kind={spec.kind}; "
            "add sampler.schedule.kind=file to sample on the file's grid (or drop the path)"
        )
    if spec.kind == "explicit":
        return validate_sigmas(spec.sigmas, steps)
    if spec.kind == "file":
        return schedule_file_sigmas(spec.path, steps)
    check_range("sampler.steps", steps, low=1)
    check_choice("sampler.schedule.final_sigmas_type", spec.final_sigmas_type, FINAL_SIGMAS)
    sigma_min = spec.sigma_min if spec.sigma_min is not None else getattr(model, "sigma_min", 0.002)
    sigma_max = spec.sigma_max if spec.sigma_max is not None else getattr(model, "sigma_max", 80.0)
    check_range("sampler.schedule.sigma_min", sigma_min, low=0, low_inclusive=False)
    if sigma_min >= sigma_max:
        fail(f"sampler.schedule.sigma_min={sigma_min} must be below sigma_max={sigma_max}")
    to_sigma_min = append_zero and spec.final_sigmas_type == "sigma_min"
    # a range kind ends at sigma_min by itself: ending the grid there takes one more level of it
    extra_level = not append_zero or (to_sigma_min and spec.kind != "time_uniform")
    points = steps + 1 if extra_level else steps
    table = getattr(model, "discrete_sigmas", None)
    table = default_table() if table is None else table.detach().cpu()
    sigmas = positive_levels(spec, points, sigma_min, sigma_max, table)
    if points == 1 and (spec.kind, spec.convention) != ("time_uniform", "multistep"):
        sigmas = sigmas.new_tensor([sigma_max])  # (DDIM's one 'leading' timestep would be t = 0)
    if not append_zero or extra_level:
        return sigmas
    if not to_sigma_min:
        return torch.cat([sigmas, sigmas.new_zeros(1)])
    return append_table_minimum(sigmas, table)


def positive_levels(
    spec: ScheduleSpec, points: int, sigma_min: float, sigma_max: float, table: Tensor
) -> Tensor:
    """``points`` descending positive levels of ``spec``'s kind; a range kind spans [sigma_min, sigma_max]."""
    if spec.kind == "karras":
        check_range("sampler.schedule.rho", spec.rho, low=0, low_inclusive=False)
        return karras_sigmas(points, sigma_min, sigma_max, spec.rho)
    if spec.kind == "loglinear":
        return loglinear_sigmas(points, sigma_min, sigma_max)
    if spec.kind == "vp":
        return vp_sigmas(points, sigma_min, sigma_max, **spec.extra)
    if spec.kind == "quadratic":
        return quadratic_sigmas(points, sigma_min, sigma_max, table)
    return time_uniform_sigmas(points, table, spec.spacing, spec.convention, int(spec.steps_offset))


def append_table_minimum(sigmas: Tensor, table: Tensor) -> Tensor:
    """``sigmas`` (timesteps of ``table``) followed by the table's lowest level, diffusers' "sigma_min"."""
    lowest = table.double().min()
    if float(sigmas[-1]) <= float(lowest):
        fail(
            "sampler.schedule.final_sigmas_type=sigma_min: the last timestep is already t = 0 (sigma_min), "
            "so the final step would have zero length; use sampler.schedule.convention=multistep, "
            "spacing=trailing or steps_offset=1"
        )
    return torch.cat([sigmas, lowest.reshape(1)])


def validate_sigmas(
    sigmas: Any, steps: int | None = None, setting: str = "sampler.schedule.sigmas"
) -> Tensor:
    """Check an explicit grid: strictly decreasing, positive until a final 0, ``steps + 1`` long.

    ``setting`` names the grid's origin in the error messages (a config key or a schedule file).
    """
    if sigmas is None:
        fail(f"{setting} must be given for schedule kind 'explicit'")
    try:
        grid = torch.as_tensor([float(value) for value in sigmas], dtype=torch.float64)
    except (TypeError, ValueError):
        fail(f"{setting} must be a list of numbers, got {sigmas!r}")
    if grid.ndim != 1 or len(grid) < 2:
        fail(f"{setting} needs at least two values (start and 0)")
    if not bool(torch.isfinite(grid).all()):
        fail(f"{setting} must be finite numbers")
    if steps is not None and len(grid) != steps + 1:
        fail(f"{setting} has {len(grid)} values; {steps} steps need {steps + 1}")
    if float(grid[-1]) != 0.0:
        fail(f"{setting} must end at 0, got {float(grid[-1])}")
    if not bool((grid[:-1] > grid[1:]).all()):
        position = int((grid[:-1] <= grid[1:]).nonzero()[0])
        fail(
            f"{setting} must be strictly decreasing; values {position} and {position + 1} are "
            f"{float(grid[position])} and {float(grid[position + 1])}"
        )
    return grid


# -- schedule files --------------------------------------------------------------------------------
def schedules_dir() -> Path:
    """Shipped schedule files: ``$FASTSAMPLE_ASSETS/schedules`` if set, else the package's."""
    root = os.environ.get("FASTSAMPLE_ASSETS") or Path(__file__).resolve().parents[1] / "assets"
    return Path(root) / "schedules"


def resolve_schedule_path(path: str | os.PathLike | None) -> Path:
    """A schedule file by path, or by name relative to :func:`schedules_dir` (shipped schedules)."""
    if path is None or not str(path):
        fail("sampler.schedule.path must name a schedule file (.yaml or .json) for schedule kind 'file'")
    candidate = Path(path).expanduser()
    if candidate.is_file():
        return candidate
    shipped = schedules_dir() / candidate
    if not candidate.is_absolute() and shipped.is_file():
        return shipped
    fail(f"sampler.schedule.path={str(path)!r}: no such schedule file (also looked in {schedules_dir()})")


def load_schedule_file(path: str | os.PathLike | None) -> dict[str, Any]:
    """Read a schedule file (YAML or JSON): a mapping with ``sigmas`` and its provenance."""

    resolved = resolve_schedule_path(path)
    try:
        text = resolved.read_text()
        content = json.loads(text) if resolved.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as err:
        fail(f"sampler.schedule.path={str(path)!r} is not a readable schedule file: {err}".splitlines()[0])
    if not isinstance(content, dict) or "sigmas" not in content:
        fail(f"sampler.schedule.path={str(path)!r} is not a schedule file: it has no 'sigmas' list")
    content["path"] = str(resolved)
    return content


def schedule_file_sigmas(path: str | os.PathLike | None, steps: int | None = None) -> Tensor:
    """The validated sigma grid of a schedule file, refusing one whose length is not ``steps + 1``."""
    content = load_schedule_file(path)
    setting = f"schedule file {content['path']}"
    sigmas = content["sigmas"]
    if steps is not None and isinstance(sigmas, list) and len(sigmas) != steps + 1:
        made_for = ", ".join(
            f"{key} {content[key]}" for key in ("sampler", "nfe") if content.get(key) is not None
        )
        fail(
            f"{setting} holds {len(sigmas) - 1} steps ({made_for or 'no provenance'}) but "
            f"sampler.steps={steps}; set sampler.steps={len(sigmas) - 1} or use a schedule made for "
            f"{steps} steps"
        )
    return validate_sigmas(sigmas, steps, setting=setting)


def save_schedule_file(path: str | os.PathLike, sigmas: Any, **provenance: Any) -> Path:
    """Write a schedule file atomically: YAML (``.yaml`` / ``.yml``) or JSON (``.json``).

    The sigmas are validated first and written at full precision (they load back bit for bit);
    ``provenance`` (model, sampler, NFE, method, trajectories, seeds, ...) is stored beside them.
    """

    path = Path(path)
    check_choice("schedule file suffix", path.suffix, (".yaml", ".yml", ".json"))
    grid = validate_sigmas(sigmas, setting=f"schedule for {path}")
    content = {
        "format": SCHEDULE_FORMAT,
        "steps": len(grid) - 1,
        **_plain(provenance),
        "sigmas": [float(value) for value in grid],
    }
    if path.suffix == ".json":
        text = json.dumps(content, indent=2) + "\n"
    else:
        text = yaml.safe_dump(content, sort_keys=False, default_flow_style=None, width=100)
    write_bytes_atomic(path, text.encode())
    return path


def _plain(value: Any) -> Any:
    """Provenance as plain YAML / JSON data (tensors, tuples and paths become lists, numbers, strings)."""
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, Tensor):
        return _plain(value.tolist())
    if isinstance(value, (np.generic,)):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
