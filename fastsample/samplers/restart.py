"""Restart sampling (Xu et al., NeurIPS 2023): a backward ODE plus forward noise jumps on intervals.

The main solver integrates the probability-flow ODE along ``sigmas``. Each restart interval
``(t_min, t_max, K, N_restart)`` (sigma units; EDM's t = sigma) acts where the main solver lands on
t_min: K times, the state jumps forward to t_max with fresh noise,
``x <- x + S_noise * sqrt(t_max^2 - t_min^2) * eps``, and the ODE is solved back from t_max to
t_min on a rho=7 grid of ``N_restart`` points. The jump is the exact forward process, so errors
accumulated before t_min contract while the ODE keeps the steps cheap and precise.

- t_min snaps to the nearest positive main-grid sigma below t_max, so the main solver stops exactly
  there (the paper's rule; "below t_max" keeps an interval valid on coarse grids).
- The main and inner solvers are any deterministic sampler of the registry, run on sub-grids:
  the main grid is split at the restart points (a multistep solver restarts its history there,
  which is what the changed state needs).
- NFE: ``nfe_main(N) + sum_i K_i (nfe_inner(N_restart_i) - nfe_inner(1))``; an inner solve ends at
  t_min > 0, so every inner step is a full step: for Heun ``(2 N - 1) + sum_i K_i 2 (N_restart_i - 1)``.
- ``renoise="vp"``: the Stable Diffusion variant for discrete-time VP models, the jump written in
  the VP state ``x_vp = x / sqrt(1 + sigma^2)`` as ``sqrt(abar_max / abar_min) x_vp +
  sqrt(1 - abar_max / abar_min) eps``. Mapped back to sigma space this is *exactly* the jump above
  (same noise, same variance; only float rounding differs), so the variant's real content is where
  it lands: t_max snaps to the nearest trained timestep of a model with a discrete sigma table,
  and ``restart_schedule="time_uniform"`` puts the inner steps on trained timesteps too (as DDIM
  does in the paper's Stable Diffusion experiments).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fastsample.diffusion.schedules import karras_sigmas
from fastsample.samplers.common import Callback, GuidanceFn, bind
from fastsample.samplers.registry import SAMPLERS, SamplerSpec, get_sampler, register
from fastsample.utils.errors import check_choice, check_range, fail
from fastsample.utils.seeding import randn_like

INTERVAL_KEYS = ("t_min", "t_max", "K", "N_restart")
RENOISE = ("ve", "vp")
RESTART_SCHEDULES = ("karras", "time_uniform")
#: relative slack when comparing user sigmas with (possibly float32) grid levels
RTOL = 1e-6


@dataclass(frozen=True)
class RestartInterval:
    """One restart interval: jump from t_min to t_max and back, K times, on N_restart inner points."""

    t_min: float
    t_max: float
    K: int
    N_restart: int


def _integer(setting: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not float(value).is_integer():
        fail(f"{setting}={value!r} must be an integer >= {low}")
    check_range(setting, int(value), low=low)
    return int(value)


def parse_restart_list(restart_list: Any) -> list[RestartInterval]:
    """Validate ``restart_list``: a list of ``{t_min, t_max, K, N_restart}`` maps or 4-item lists."""
    if restart_list is None:
        return []
    if isinstance(restart_list, (str, Mapping)) or not isinstance(restart_list, Sequence):
        fail(
            "sampler.restart_list must be a list of intervals, each {t_min, t_max, K, N_restart} "
            f"or [t_min, t_max, K, N_restart]; got {restart_list!r}"
        )
    intervals = []
    for i, item in enumerate(restart_list):
        where = f"sampler.restart_list[{i}]"
        if isinstance(item, Mapping):
            unknown = sorted(set(map(str, item)) - set(INTERVAL_KEYS))
            missing = [key for key in INTERVAL_KEYS if key not in item]
            if unknown or missing:
                problem = f"unknown keys {unknown}" if unknown else f"missing keys {missing}"
                fail(f"{where} has {problem}; an interval has exactly: {', '.join(INTERVAL_KEYS)}")
            values = [item[key] for key in INTERVAL_KEYS]
        elif isinstance(item, Sequence) and not isinstance(item, str) and len(item) == 4:
            values = list(item)
        else:
            fail(f"{where}={item!r} is not an interval; write {{t_min, t_max, K, N_restart}} or 4 numbers")
        for key, value in zip(INTERVAL_KEYS, values):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                fail(f"{where}.{key}={value!r} must be a finite number")
        t_min, t_max = float(values[0]), float(values[1])
        check_range(f"{where}.t_min", t_min, low=0, low_inclusive=False)
        if t_min >= t_max:
            fail(f"{where}.t_min={t_min} must be below {where}.t_max={t_max}; allowed: 0 < t_min < t_max")
        k = _integer(f"{where}.K", values[2], 0)
        n_restart = _integer(f"{where}.N_restart", values[3], 2)
        intervals.append(RestartInterval(t_min, t_max, k, n_restart))
    return intervals


def ode_solver(setting: str, name: str) -> SamplerSpec:
    """A deterministic registered solver usable on sub-grids (not Restart itself, not stochastic)."""
    allowed = sorted(n for n, spec in SAMPLERS.items() if not spec.stochastic and n != "restart")
    check_choice(setting, name, allowed)
    return get_sampler(name)


def restart_nfe(
    steps: int,
    *,
    restart_list: Any = None,
    solver: str = "heun",
    restart_solver: str | None = None,
    **_: Any,
) -> int:
    """Model calls: the main solver's on ``steps`` steps plus, per interval, K inner solves.

    An inner solve of ``N_restart - 1`` steps ends at t_min > 0; for every registered solver such a
    solve costs what an ``N_restart``-step solve to 0 costs minus its final one-call step.
    """
    main = ode_solver("sampler.solver", solver)
    inner = ode_solver("sampler.restart_solver", restart_solver or solver)
    total = main.count_nfe(steps)
    for interval in parse_restart_list(restart_list):
        total += interval.K * (inner.count_nfe(interval.N_restart) - inner.count_nfe(1))
    return total


def snap_to_grid(levels: Sequence[float], interval: RestartInterval, where: str) -> int:
    """Index of the positive main-grid level nearest to t_min among those below t_max."""
    start = levels[0]
    positive = [j for j in range(1, len(levels)) if levels[j] > 0]
    if interval.t_max > start * (1 + RTOL):
        fail(
            f"{where}.t_max={interval.t_max} is above the schedule's start sigma {start:.6g}; "
            f"allowed: t_max <= {start:.6g}"
        )
    lowest = min((levels[j] for j in positive), default=start)
    if not positive or interval.t_min < lowest * (1 - RTOL):
        fail(
            f"{where}.t_min={interval.t_min} is below the schedule's lowest positive sigma {lowest:.6g}; "
            f"allowed: [{lowest:.6g}, t_max)"
        )
    below = [j for j in positive if levels[j] < interval.t_max * (1 - RTOL)]
    if not below:
        fail(
            f"{where}=[{interval.t_min}, {interval.t_max}] contains no step of the main grid "
            f"(its levels near there: {', '.join(f'{levels[j]:.4g}' for j in positive[-3:])}); "
            "widen the interval or use more steps"
        )
    return min(below, key=lambda j: abs(levels[j] - interval.t_min))


def _nearest_table_level(table: Tensor, sigma: float) -> float:
    log_table = table.double().log()
    return float(table.double()[(log_table - math.log(sigma)).abs().argmin()])


def inner_grid(
    t_min: float, t_max: float, points: int, rho: float, schedule: str, table: Tensor | None, where: str
) -> Tensor:
    """``points`` descending float64 levels from t_max to t_min (both ends exact)."""
    if schedule == "karras":
        grid = karras_sigmas(points, t_min, t_max, rho)
    else:
        if table is None:
            fail(
                "sampler.restart_schedule='time_uniform' needs a discrete-time model (one with "
                "discrete_sigmas); use 'karras'"
            )
        # fractional timesteps of the endpoints (log-sigma interpolation of the ascending table)
        log_table = table.double().log().numpy()
        t_lo, t_hi = np.interp([math.log(t_min), math.log(t_max)], log_table, np.arange(len(log_table)))
        timesteps = torch.linspace(t_hi, t_lo, points, dtype=torch.float64).round().long()
        if len(set(timesteps.tolist())) < points:
            fail(
                f"{where}: {points} restart points do not fit between timesteps {t_lo:.0f} and {t_hi:.0f} "
                "of the model; lower N_restart or widen the interval"
            )
        grid = table.double()[timesteps]
    grid[0], grid[-1] = t_max, t_min
    return grid


def jump(x: Tensor, noise: Tensor, t_min: float, t_max: float, s_noise: float, renoise: str) -> Tensor:
    """The forward jump from t_min to t_max: VE (sigma space) or the same jump in the VP-scaled state."""
    if renoise == "ve":
        return x + noise * (s_noise * math.sqrt(t_max**2 - t_min**2))
    abar_min, abar_max = 1 / (1 + t_min**2), 1 / (1 + t_max**2)
    ratio = abar_max / abar_min
    x_vp = x * math.sqrt(abar_min)
    x_vp = math.sqrt(ratio) * x_vp + (s_noise * math.sqrt(1 - ratio)) * noise
    return x_vp / math.sqrt(abar_max)


@register("restart", nfe=restart_nfe)
def sample_restart(
    denoiser: Any,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: dict | None = None,
    guidance: GuidanceFn | None = None,
    generator: Any = None,
    callback: Callback | None = None,
    restart_list: Any = None,
    solver: str = "heun",
    restart_solver: str | None = None,
    restart_rho: float = 7.0,
    restart_schedule: str = "karras",
    s_noise: float = 1.0,
    renoise: str = "ve",
) -> Tensor:
    """Restart sampling along ``sigmas`` with ``restart_list`` = [(t_min, t_max, K, N_restart), ...].

    ``solver`` is the main ODE solver and ``restart_solver`` the inner one (default: the same),
    each run with its registry defaults. ``callback`` sees the main steps with their main-grid
    indices; the report of the step landing on t_min comes after its restarts, with the restarted
    state (so :func:`sample_trajectory` records what the main solver continues from).
    Without intervals (or with K = 0 everywhere) this is exactly the main solver.
    """
    intervals = parse_restart_list(restart_list)
    main = ode_solver("sampler.solver", solver)
    inner = ode_solver("sampler.restart_solver", restart_solver or solver)
    check_range("sampler.restart_rho", restart_rho, low=0, low_inclusive=False)
    check_range("sampler.s_noise", s_noise, low=0)
    check_choice("sampler.renoise", renoise, RENOISE)
    check_choice("sampler.restart_schedule", restart_schedule, RESTART_SCHEDULES)
    model = bind(denoiser, cond, guidance)
    levels = sigmas.tolist()
    table = getattr(model.denoiser, "discrete_sigmas", None)
    table = None if table is None else table.detach().cpu()

    # Where each interval acts (main-grid index of its snapped t_min) and its inner grid.
    plan: dict[int, list[tuple[RestartInterval, Tensor]]] = {}
    for i, interval in enumerate(intervals):
        where = f"sampler.restart_list[{i}]"
        index = snap_to_grid(levels, interval, where)
        if interval.K == 0:
            continue
        t_min, t_max = levels[index], interval.t_max
        if renoise == "vp" and table is not None:
            t_max = _nearest_table_level(table, t_max)
            if t_max <= t_min:
                fail(
                    f"{where}.t_max={interval.t_max} snaps to the timestep sigma {t_max:.4g}, not above t_min"
                )
        grid = inner_grid(t_min, t_max, interval.N_restart, restart_rho, restart_schedule, table, where)
        grid = grid.to(device=sigmas.device, dtype=sigmas.dtype)
        grid[-1] = sigmas[index]  # the very level the main solver stopped on
        plan.setdefault(index, []).append((interval, grid))

    main_knobs, inner_knobs = main.knobs(), inner.knobs()
    bounds = sorted({0, *plan, len(sigmas) - 1})
    inner_denoised: list[Tensor] = []  # the last inner step's denoised estimate (for the callback)
    inner_report = None if callback is None else (lambda info: inner_denoised.insert(0, info["denoised"]))
    for start, stop in zip(bounds[:-1], bounds[1:]):
        held: list[dict[str, Any]] = []  # the report of the step landing on t_min, sent after restarts
        step_report = None
        if callback is not None:
            step_report = _shifted(callback, sigmas, start, held if stop in plan else None, stop - 1)
        if stop > start:
            segment = sigmas[start : stop + 1]
            x = main.fn(model, x, segment, generator=generator, callback=step_report, **main_knobs)
        for interval, grid in plan.get(stop, []):
            t_min, t_max = float(grid[-1]), float(grid[0])
            for _ in range(interval.K):
                x = jump(x, randn_like(x, generator), t_min, t_max, s_noise, renoise)
                x = inner.fn(model, x, grid, generator=generator, callback=inner_report, **inner_knobs)
        if held and callback is not None:
            callback({**held[0], "x": x, "denoised": inner_denoised[0]})
            inner_denoised.clear()
    return x


def _shifted(
    callback: Callback, sigmas: Tensor, offset: int, hold: list[dict[str, Any]] | None, last: int
) -> Callback:
    """A sub-grid callback reporting main-grid indices; the step to index ``last + 1`` is held back."""

    def report(info: dict[str, Any]) -> None:
        i = info["i"] + offset
        shifted = {**info, "i": i, "sigma": sigmas[i], "sigma_next": sigmas[i + 1]}
        if hold is not None and i == last:
            hold.append(shifted)
        else:
            callback(shifted)

    return report
