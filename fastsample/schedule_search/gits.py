"""GITS-style schedule search (Chen et al., 2024, arXiv 2405.11326): dynamic programming on step costs.

1. Cost: on the teacher trajectories, ``cost[i, j]`` is the RMS error of *one* step of the chosen
   sampler from the teacher state at candidate level ``i`` to level ``j`` against the teacher state
   there (node ``N`` = sigma 0, the teacher's end point).
2. DP: the ``K``-step path from node 0 (sigma_max) to node ``N`` of least total cost (raw RMS
   errors, as in GITS; weighting them by their propagation to sigma = 0 under a Gaussian model
   was measured to give worse schedules, see docs/schedules.md).
3. Refinement (multistep solvers): a one-step cost sees the sampler's *single-step form*: a
   multistep solver run on a two-level grid takes its warm-up step (DPM-Solver++(2M), UniPC,
   iPNDM: a DDIM / Euler step), because its history depends on the previous node of the path,
   which the DP does not know. The DP path is therefore polished by coordinate descent on the
   candidate grid with the *real* solver: each interior level moves to a neighbouring candidate
   while the final RMS error of the full K-step run against the teacher end points drops. This
   accounts for the history exactly, at the price of full runs (``K`` NFE per trial).

Every sampler of the registry gets a cost: the step runs the sampler's own function on
``[sigma_i, sigma_j]``. The first model call of every step from level ``i`` is the same, so it is
computed once per level (:class:`FirstCallCache`): the cost matrix of a one-call-per-step sampler
costs ``N`` model calls, not ``N^2 / 2``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from fastsample.samplers import Sampler
from fastsample.schedule_search.trajectories import Trajectories, final_rms, slice_cond
from fastsample.utils.errors import check_range, fail

log = logging.getLogger(__name__)


class FirstCallCache:
    """A denoiser that answers the primed call ``(x, sigma)`` from memory and counts real calls.

    ``x`` is matched by identity (the very tensor the step starts from), ``sigma`` by value.
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self.calls = 0
        self._key: tuple[Tensor, float] | None = None
        self._value: Tensor | None = None

    def prime(self, x: Tensor, sigma: float, **cond: Any) -> None:
        self._key, self._value = None, self(x, x.new_full((x.shape[0],), sigma), **cond)
        self._key = (x, float(x.new_tensor(sigma)))

    def __call__(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        if self._key is not None and x is self._key[0] and bool((sigma == self._key[1]).all()):
            return self._value
        self.calls += 1
        return self.model(x, sigma, **cond)

    def __getattr__(self, name: str) -> Any:  # sigma range, shapes, ... of the wrapped model
        if name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)


def step_costs(
    sampler: Sampler,
    model: Any,
    trajectories: Trajectories,
    *,
    guidance: Any = None,
    batch_size: int = 128,
    progress: bool = True,
) -> tuple[Tensor, int]:
    """The ``(N + 1) x (N + 1)`` one-step cost matrix (``inf`` where ``j <= i``) and the model calls spent.

    Node ``k < N`` is candidate level ``k``; node ``N`` is sigma = 0.
    """
    levels = trajectories.levels.tolist() + [0.0]
    nodes = len(levels)
    squared = torch.zeros(nodes, nodes, dtype=torch.float64)
    cached = FirstCallCache(model)
    batches = range(0, len(trajectories), batch_size)
    bar = tqdm(total=(nodes - 1) * len(batches), desc="GITS step costs", disable=not progress)
    with torch.no_grad():
        for first in batches:
            rows = slice(first, first + batch_size)
            cond = slice_cond(trajectories.cond, rows)
            for i in range(nodes - 1):
                x = trajectories.target(i)[rows]
                cached.prime(x, levels[i], **(cond or {}))
                for j in range(i + 1, nodes):
                    grid = torch.tensor([levels[i], levels[j]], dtype=torch.float64)
                    out = sampler.run(cached, x, grid, cond=cond, guidance=guidance)
                    squared[i, j] += float((out - trajectories.target(j)[rows]).double().pow(2).sum())
                bar.update(1)
    bar.close()
    cost = (squared / (len(trajectories) * trajectories.final[0].numel())).sqrt()
    upper = torch.ones(nodes, nodes, dtype=torch.bool).triu(1)
    return cost.masked_fill(~upper, float("inf")), cached.calls


def best_path(cost: Tensor, steps: int) -> tuple[list[int], float]:
    """The least-cost path ``0 = p_0 < p_1 < ... < p_steps = N`` through ``cost[p_k, p_k+1]`` (DP).

    ``cost`` is ``(N + 1) x (N + 1)``; entries with ``j <= i`` (and any ``inf``) are forbidden.
    Returns the node indices and the total cost. O(steps N^2).
    """
    cost = torch.as_tensor(cost, dtype=torch.float64)
    nodes = cost.shape[0]
    if cost.ndim != 2 or cost.shape[1] != nodes:
        fail(f"the cost matrix must be square, got shape {tuple(cost.shape)}")
    check_range("schedule steps", steps, low=1)
    if steps > nodes - 1:
        fail(
            f"{steps} steps need at least {steps + 1} candidate nodes, got {nodes}; "
            "raise schedule_search.candidates"
        )
    allowed = torch.ones(nodes, nodes, dtype=torch.bool).triu(1)
    cost = cost.masked_fill(~allowed, float("inf"))
    best = torch.full((nodes,), float("inf"), dtype=torch.float64)
    best[0] = 0.0
    parents = []
    for _ in range(steps):
        totals = best[:, None] + cost  # totals[i, j]: reach i in k-1 steps, then step i -> j
        best, parent = totals.min(dim=0)
        parents.append(parent)
    if not torch.isfinite(best[-1]):
        fail(f"no finite-cost path of {steps} steps through the cost matrix")
    path = [nodes - 1]
    for parent in reversed(parents):
        path.append(int(parent[path[-1]]))
    return path[::-1], float(best[-1])


def refine_path(
    path: list[int],
    evaluate: Callable[[list[int]], float],
    *,
    sweeps: int = 3,
    progress: bool = True,
) -> tuple[list[int], float, int]:
    """Coordinate descent on the interior nodes of ``path`` (first and last stay), minimizing ``evaluate``.

    Each sweep visits every interior node and moves it along the candidate grid in the direction
    that lowers ``evaluate``, as long as it keeps lowering it, doubling the stride after every
    successful move (a long way costs a few evaluations) and falling back to single candidates
    after a failed one; nodes never reach their neighbours. Stops after ``sweeps`` sweeps or a
    sweep without a move. Returns the path, its value and the number of evaluations.
    """
    path = list(path)
    value, evaluations = evaluate(path), 1
    bar = tqdm(total=sweeps * max(len(path) - 2, 0), desc="GITS refinement", disable=not progress)
    for _ in range(sweeps):
        moved = False
        for k in range(1, len(path) - 1):
            for direction in (-1, 1):
                stride, improved = 1, False
                while True:
                    node = path[k] + direction * stride
                    if path[k - 1] < node < path[k + 1]:
                        trial = [*path[:k], node, *path[k + 1 :]]
                        trial_value = evaluate(trial)
                        evaluations += 1
                        if trial_value < value:
                            path, value, improved, moved = trial, trial_value, True, True
                            stride *= 2
                            continue
                    if stride == 1:
                        break
                    stride = 1  # overshot (or left the gap): go on one candidate at a time
                if improved:
                    break  # found the downhill direction; no need to try the other
            bar.update(1)
        if not moved:
            break
    bar.close()
    return path, value, evaluations


def gits_search(
    sampler: Sampler,
    model: Any,
    trajectories: Trajectories,
    *,
    guidance: Any = None,
    cost: Tensor | None = None,
    refine_sweeps: int = 3,
    refine_trajectories: int | None = None,
    batch_size: int = 128,
    progress: bool = True,
) -> tuple[Tensor, dict[str, Any]]:
    """GITS for ``sampler.steps`` steps: DP on one-step costs, then refinement with the real sampler.

    ``cost`` is a cost matrix of :func:`step_costs` for this sampler and these trajectories (it does
    not depend on the step count, so searches for several NFEs share it); ``None`` computes it.
    Returns the sigma grid (float64, ``steps + 1`` values ending at 0) and a report (the DP grid,
    costs, model calls and timings of every stage).
    """

    nodes = trajectories.levels.tolist() + [0.0]
    grid_of = lambda path: torch.tensor([nodes[k] for k in path], dtype=torch.float64)  # noqa: E731
    report: dict[str, Any] = {}
    if cost is None:
        start = time.perf_counter()
        cost, cost_calls = step_costs(
            sampler, model, trajectories, guidance=guidance, batch_size=batch_size, progress=progress
        )
        report.update(
            cost_model_calls=cost_calls,
            cost_trajectories=len(trajectories),
            cost_wall_s=round(time.perf_counter() - start, 2),
        )
    path, total = best_path(cost, sampler.steps)
    report.update(dp_sigmas=grid_of(path).tolist(), dp_cost=total)
    log.info(
        "GITS DP: %d steps, total one-step cost %.4g, sigmas %s", sampler.steps, total, report["dp_sigmas"]
    )
    if refine_sweeps > 0 and sampler.steps > 1:
        start = time.perf_counter()
        subset = trajectories.subset(refine_trajectories)
        evaluate = lambda p: final_rms(  # noqa: E731
            sampler, model, grid_of(p), subset, guidance=guidance, batch_size=batch_size
        )
        dp_rms = evaluate(path)
        path, refined_rms, evaluations = refine_path(path, evaluate, sweeps=refine_sweeps, progress=progress)
        report.update(
            refine_trajectories=len(subset),
            refine_rms_before=dp_rms,
            refine_rms_after=refined_rms,
            refine_evaluations=evaluations + 1,
            refine_model_calls=(evaluations + 1) * sampler.nfe,
            refine_wall_s=round(time.perf_counter() - start, 2),
        )
        log.info(
            "GITS refinement: final RMS %.4g -> %.4g on %d trajectories (%d runs)",
            dp_rms,
            refined_rms,
            len(subset),
            evaluations + 1,
        )
    return grid_of(path), report
