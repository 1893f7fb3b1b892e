"""Teacher trajectories: high-accuracy ODE solutions recorded on a fine grid of candidate sigmas.

Both searches measure a schedule against them: GITS compares one coarse step from a recorded state
with the recorded state at the step's end, AYS compares the whole coarse run with the recorded
end point. The teacher integrates on the candidate grid refined ``substeps`` times in log sigma, so
every candidate level is a node of the teacher's grid (states are exact solver states, not
interpolations) and the grid is smooth enough for a third-order multistep teacher.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from fastsample.samplers import Sampler
from fastsample.utils.errors import check_range, fail


def candidate_sigmas(sigma_min: float, sigma_max: float, count: int) -> Tensor:
    """``count`` positive levels uniform in log sigma from ``sigma_max`` down to ``sigma_min`` (float64)."""
    check_range("schedule_search.candidates", count, low=2)
    levels = torch.linspace(math.log(sigma_max), math.log(sigma_min), count, dtype=torch.float64).exp()
    levels[0], levels[-1] = sigma_max, sigma_min  # exactly, not exp(log(.))
    return levels


def refine_grid(levels: Tensor, substeps: int) -> Tensor:
    """``levels`` (descending, positive) with ``substeps - 1`` log-uniform levels in each gap, then 0.

    Level ``k`` of ``levels`` sits at position ``k * substeps`` of the result.
    """
    check_range("schedule_search.teacher.substeps", substeps, low=1)
    logs = levels.double().log()
    fractions = torch.arange(substeps, dtype=torch.float64) / substeps
    inner = logs[:-1, None] + fractions[None] * (logs[1:] - logs[:-1])[:, None]
    return torch.cat([inner.reshape(-1).exp(), levels[-1:].double(), levels.new_zeros(1).double()])


def steps_for_nfe(sampler: Sampler, nfe: int) -> int:
    """The step count at which ``sampler`` (its name and knobs) makes exactly ``nfe`` model calls."""
    check_range("schedule_search.nfe", nfe, low=1)
    counts = {}
    for steps in range(1, 2 * nfe + 2):
        counts[steps] = with_steps(sampler, steps).nfe
        if counts[steps] == nfe:
            return steps
    below = [value for value in counts.values() if value < nfe]
    above = [value for value in counts.values() if value > nfe]
    nearest = ", ".join(str(v) for v in ([max(below)] if below else []) + ([min(above)] if above else []))
    fail(f"schedule_search.nfe={nfe} is not reachable with sampler {sampler.name!r}; nearest NFE: {nearest}")


def with_steps(sampler: Sampler, steps: int, schedule: Any = None) -> Sampler:
    """A copy of ``sampler`` (same name and knobs) with another step count and optionally schedule."""
    return Sampler(
        sampler.name, steps, schedule if schedule is not None else sampler.schedule, **sampler.knobs
    )


def slice_cond(cond: dict[str, Tensor] | None, rows: slice | Tensor) -> dict[str, Tensor] | None:
    """The condition of a subset of rows (per-sample tensors are sliced, anything else is kept)."""
    if cond is None:
        return None
    return {
        key: value[rows] if isinstance(value, Tensor) and value.ndim else value for key, value in cond.items()
    }


@dataclass
class Trajectories:
    """Teacher solutions of the probability-flow ODE from fixed start noise.

    ``levels`` are the candidate sigmas (descending, positive); ``states[k]`` is the teacher state at
    ``levels[k]`` for every trajectory (``None`` when only the end points were kept); ``final`` is
    the solution at sigma = 0. ``noise`` is the standard normal start noise (the start state is
    ``noise * levels[0]``).
    """

    levels: Tensor
    noise: Tensor
    final: Tensor
    states: Tensor | None = None
    cond: dict[str, Tensor] | None = None
    seeds: list[int] = field(default_factory=list)
    teacher: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.final)

    def subset(self, count: int | None) -> Trajectories:
        """The first ``count`` trajectories (all for ``None``)."""
        if count is None or count >= len(self):
            return self
        check_range("trajectory subset", count, low=1)
        return Trajectories(
            self.levels,
            self.noise[:count],
            self.final[:count],
            None if self.states is None else self.states[:, :count],
            slice_cond(self.cond, slice(0, count)),
            self.seeds[:count],
            self.teacher,
        )

    def target(self, node: int) -> Tensor:
        """The teacher state at node ``node``: a candidate level, or sigma = 0 for ``len(levels)``."""
        if node == len(self.levels):
            return self.final
        if self.states is None:
            fail("these trajectories kept only their end points; record=True keeps the states")
        return self.states[node]


def teacher_trajectories(
    model: Any,
    noise: Tensor,
    levels: Tensor,
    *,
    teacher: str = "dpmpp_3m",
    substeps: int = 2,
    cond: dict[str, Tensor] | None = None,
    guidance: Any = None,
    record: bool = True,
    batch_size: int = 128,
    seeds: list[int] | None = None,
    progress: bool = True,
) -> Trajectories:
    """Integrate from ``noise * levels[0]`` to 0 with ``teacher`` on the refined candidate grid.

    With ``record`` the states at every candidate level are kept (``len(levels) x`` the batch, in the
    noise's dtype and device); without, only the end points.
    """
    solver = Sampler(teacher, 1)
    if solver.spec.stochastic:
        fail(f"schedule_search.teacher.sampler={teacher!r} is stochastic; the teacher must be an ODE solver")
    grid = refine_grid(levels, substeps)
    positions = {k * substeps: k for k in range(len(levels))}
    finals, recorded = [], []
    batches = range(0, len(noise), batch_size)
    bar = tqdm(total=len(batches) * (len(grid) - 1), desc=f"teacher {teacher}", disable=not progress)
    with torch.no_grad():
        for first in batches:
            rows = slice(first, first + batch_size)
            x = noise[rows] * float(levels[0])
            states: list[Tensor] = [x.clone()] if record else []

            def keep(info: dict[str, Any], states: list[Tensor] = states) -> None:
                bar.update(1)
                if record and info["i"] + 1 in positions:
                    states.append(info["x"].detach().clone())

            finals.append(
                solver.run(model, x, grid, cond=slice_cond(cond, rows), guidance=guidance, callback=keep)
            )
            if record:
                recorded.append(torch.stack(states))
    bar.close()
    return Trajectories(
        levels=levels.double(),
        noise=noise,
        final=torch.cat(finals),
        states=torch.cat(recorded, dim=1) if record else None,
        cond=cond,
        seeds=list(seeds) if seeds is not None else [],
        teacher={"sampler": teacher, "steps": len(grid) - 1, "substeps": substeps},
    )


def final_error(
    sampler: Sampler,
    model: Any,
    sigmas: Tensor,
    trajectories: Trajectories,
    *,
    guidance: Any = None,
    batch_size: int = 128,
    grad: bool = False,
    backward: Callable[[Tensor], None] | None = None,
) -> Tensor:
    """Mean squared error of ``sampler`` on ``sigmas`` against the teacher end points (all trajectories).

    Each run starts from the trajectory's noise times ``sigmas[0]`` (as :meth:`Sampler.sample`).
    With ``backward`` each batch's share of the loss is back-propagated as it is computed (memory of
    one batch), and the detached total is returned.
    """
    total, count = 0.0, len(trajectories) * trajectories.final[0].numel()
    for first in range(0, len(trajectories), batch_size):
        rows = slice(first, first + batch_size)
        x = trajectories.noise[rows] * float(sigmas[0].detach())
        out = sampler.run(
            model, x, sigmas, cond=slice_cond(trajectories.cond, rows), guidance=guidance, grad=grad
        )
        part = (out - trajectories.final[rows]).pow(2).sum() / count
        if backward is not None:
            backward(part)
            part = part.detach()
        total = total + part
    return torch.as_tensor(total)


def final_rms(
    sampler: Sampler, model: Any, sigmas: Tensor, trajectories: Trajectories, **kwargs: Any
) -> float:
    """RMS distance of ``sampler`` on ``sigmas`` to the teacher end points (no gradient)."""
    with torch.no_grad():
        return float(final_error(sampler, model, sigmas, trajectories, **kwargs).sqrt())
