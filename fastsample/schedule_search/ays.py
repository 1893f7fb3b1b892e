"""AYS-style schedule optimization (Sabour et al., 2024, arXiv 2404.14507): gradient steps on log-sigmas.

Align Your Steps minimizes an upper bound of the KL divergence between the coarse and the exact
process. Here the objective is the quantity the benchmarks report: the mean squared distance of
the coarse sampler's output to the teacher's ODE solution from the same noise, differentiated
through the sampler itself (the samplers never disable autograd). It applies to any ODE sampler of
the registry and accounts for multistep history exactly, because the real solver runs.

The schedule is parametrized so that every parameter value is a valid grid (:class:`LogSigmaSchedule`):
the gaps in log sigma are shares of a fixed total (softmax of free logits, each at least a small
floor), so the levels start at sigma_max, decrease strictly and stay above sigma_min whatever the
optimizer does; the final 0 is appended.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from fastsample.samplers import Sampler
from fastsample.schedule_search.trajectories import Trajectories, final_error
from fastsample.utils.errors import check_range, fail

log = logging.getLogger(__name__)


class LogSigmaSchedule(nn.Module):
    """A ``steps``-step schedule ``[sigma_max, ..., sigma_last, 0]`` with ``sigma_last > sigma_floor``.

    Free parameters: ``steps`` logits. Their softmax (floored at ``min_share / steps``) splits
    ``log(sigma_max / sigma_floor)`` into ``steps - 1`` gaps between the positive levels and a
    slack between the last level and the floor, so the grid is strictly decreasing by construction.
    The initial shares are those of ``init``, each raised to at least ``init_share / steps`` (a schedule
    that ends at the floor would otherwise start with a zero slack, whose softmax gradient vanishes:
    the last level could never move up).
    """

    def __init__(
        self, init: Tensor, sigma_floor: float, min_share: float = 1e-3, init_share: float = 0.05
    ) -> None:
        super().__init__()
        init = torch.as_tensor(init, dtype=torch.float64)
        levels = init[:-1]
        if float(init[-1]) != 0.0 or len(levels) < 1 or not bool((levels[:-1] > levels[1:]).all()):
            fail("the initial schedule must be strictly decreasing and end at 0")
        if not 0 < sigma_floor < float(levels[0]):
            fail(f"sigma floor {sigma_floor} must lie in (0, sigma_max={float(levels[0])})")
        self.steps = len(levels)
        self.sigma_max = float(levels[0])
        self.log_max = math.log(self.sigma_max)
        self.total = self.log_max - math.log(sigma_floor)
        self.floor = min_share / self.steps
        logs = levels.log()
        slack = (logs[-1] - math.log(sigma_floor)).clamp(min=0)
        shares = (torch.cat([logs[:-1] - logs[1:], slack[None]]) / self.total).clamp(
            min=init_share / self.steps
        )
        shares = shares / shares.sum()
        # invert share = floor + (1 - steps floor) softmax(logits); shares below the floor start at it
        free = ((shares - self.floor) / (1 - self.steps * self.floor)).clamp(min=1e-3 * self.floor)
        self.logits = nn.Parameter(free.log())

    def shares(self) -> Tensor:
        return self.floor + (1 - self.steps * self.floor) * self.logits.softmax(dim=0)

    def forward(self) -> Tensor:
        gaps = self.total * self.shares()[:-1]
        below = (self.log_max - gaps.cumsum(0)).exp()
        return torch.cat([below.new_tensor([self.sigma_max]), below, below.new_zeros(1)])


def ays_search(
    sampler: Sampler,
    model: Any,
    trajectories: Trajectories,
    init: Tensor,
    *,
    sigma_floor: float,
    guidance: Any = None,
    iterations: int = 50,
    lr: float = 0.1,
    batch_size: int = 128,
    progress: bool = True,
) -> tuple[Tensor, dict[str, Any]]:
    """Minimize the final MSE to the teacher over the schedule, starting from ``init`` (Adam on logits).

    Every iteration evaluates the full objective on all ``trajectories`` (deterministic, so the
    best iterate is known exactly) and keeps the best grid seen. Returns it (float64, ending at 0)
    and a report (loss history, model calls, time).
    """
    check_range("schedule_search.ays.iterations", iterations, low=0)
    check_range("schedule_search.ays.lr", lr, low=0, low_inclusive=False)
    schedule = LogSigmaSchedule(init, sigma_floor)
    optimizer = torch.optim.Adam(schedule.parameters(), lr=lr)
    best_sigmas, best_loss, history = schedule().detach(), float("inf"), []
    start = time.perf_counter()
    bar = tqdm(range(iterations + 1), desc="AYS", disable=not progress)
    for iteration in bar:
        optimizer.zero_grad()
        sigmas = schedule()
        trainable = iteration < iterations and sampler.steps > 1
        loss = float(
            final_error(
                sampler,
                model,
                sigmas if trainable else sigmas.detach(),
                trajectories,
                guidance=guidance,
                batch_size=batch_size,
                grad=trainable,
                backward=(lambda part: part.backward()) if trainable else None,
            )
        )
        if not math.isfinite(loss):
            fail(f"AYS: the loss became {loss} at iteration {iteration}; lower schedule_search.ays.lr")
        history.append(math.sqrt(loss))
        if loss < best_loss:
            best_loss, best_sigmas = loss, sigmas.detach().clone()
        bar.set_postfix(rms=f"{math.sqrt(loss):.4g}", best=f"{math.sqrt(best_loss):.4g}")
        if not trainable:
            break
        optimizer.step()
    bar.close()
    report = {
        "init_sigmas": torch.as_tensor(init).tolist(),
        "rms_history": [round(value, 6) for value in history],
        "iterations": len(history) - 1,
        "trajectories": len(trajectories),
        "model_calls_forward": len(history) * sampler.nfe,
        "wall_s": round(time.perf_counter() - start, 2),
    }
    log.info(
        "AYS: final RMS %.4g -> %.4g in %d iterations", history[0], math.sqrt(best_loss), len(history) - 1
    )
    return best_sigmas, report
