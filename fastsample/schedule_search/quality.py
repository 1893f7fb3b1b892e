"""Schedule optimization for sample quality: gradient steps on log-sigmas against a KID loss.

On a trained network at 5-10 steps the schedule closest to the ODE solution is not the one with the
best FID (docs/schedules.md: on the shipped Fashion-MNIST model Karras at NFE 10 is twice as close
to the ODE solution as at NFE 5 and scores worse). This method optimizes what is reported instead:
the DDSS objective (:mod:`fastsample.metrics.feature_loss`), KID between features of the sampler's output and
of real data, differentiated through the sampler, with the schedule as the only parameters
(:class:`~fastsample.schedule_search.ays.LogSigmaSchedule`: ``steps`` numbers, little to overfit).

Every iteration draws fresh seeds (a stochastic gradient of the population KID); every
``validate_every`` iterations the FID of a fixed validation seed set against the reference
statistics is measured, and the grid with the lowest validation FID (the start grid included) is
kept. Evaluate the result on other seeds.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from fastsample.metrics.feature_loss import image_features
from fastsample.metrics.features import FeatureExtractor
from fastsample.metrics.scores import frechet_distance, mmd2_unbiased
from fastsample.samplers import Sampler
from fastsample.samplers.ggdm import GGDMSampler
from fastsample.schedule_search.ays import LogSigmaSchedule
from fastsample.utils.errors import check_range, fail
from fastsample.utils.seeding import SeedNoise

log = logging.getLogger(__name__)


@dataclass
class QualityObjective:
    """Sample quality of ``sampler`` on ``model`` for a sigma grid, in ``features`` against real data.

    ``real_features`` (rows of real-data features) enter the KID loss; ``reference_mu`` /
    ``reference_sigma`` (the statistics of the same data) the validation FID. ``labels(seeds)`` gives
    the class labels of a seed list (``None``: unconditional). ``batch_size`` bounds the samples that
    are back-propagated at once: with more samples per iteration the loss's gradient with respect to
    the features is computed first and pushed back chunk by chunk (exact, one extra forward pass).
    """

    sampler: Sampler
    model: Any
    features: FeatureExtractor
    real_features: Tensor
    reference_mu: np.ndarray
    reference_sigma: np.ndarray
    shape: tuple[int, ...]
    labels: Any = None
    guidance: Any = None
    batch_size: int = 128
    dtype: torch.dtype = torch.float32
    device: torch.device | str = "cpu"

    def _samples(self, sigmas: Tensor, seeds: list[int], grad: bool) -> Tensor:
        noise = SeedNoise(seeds).randn(self.shape, dtype=self.dtype, device=self.device)
        labels = self.labels(seeds) if self.labels is not None else None
        cond = {"class_labels": labels.to(self.device)} if labels is not None else None
        x = noise * float(sigmas[0].detach())  # sigma_max is fixed: no gradient through the start
        return self.sampler.run(self.model, x, sigmas, cond=cond, guidance=self.guidance, grad=grad)

    def _features(self, sigmas: Tensor, seeds: list[int], grad: bool) -> Tensor:
        with torch.set_grad_enabled(grad):
            return image_features(self.features, self._samples(sigmas, seeds, grad)).double()

    def _chunks(self, seeds: list[int]) -> list[list[int]]:
        return [seeds[i : i + self.batch_size] for i in range(0, len(seeds), self.batch_size)]

    def _detached_features(self, sigmas: Tensor, seeds: list[int]) -> Tensor:
        with torch.no_grad():
            return torch.cat([self._features(sigmas.detach(), c, grad=False) for c in self._chunks(seeds)])

    def kid_backward(self, sigmas: Tensor, seeds: list[int]) -> float:
        """KID of the samples of ``seeds`` to the real features; back-propagates it into ``sigmas``."""
        chunks = self._chunks(seeds)
        real = self.real_features.to(self.device)
        if len(chunks) == 1:
            loss = mmd2_unbiased(self._features(sigmas, seeds, grad=True), real)
            loss.backward()
            return float(loss.detach())
        fake = self._detached_features(sigmas, seeds).requires_grad_(True)
        loss = mmd2_unbiased(fake, real)
        (outer,) = torch.autograd.grad(loss, fake)
        start = 0
        for chunk in chunks:
            rows = self._features(sigmas, chunk, grad=True)
            (rows * outer[start : start + len(chunk)]).sum().backward(retain_graph=chunk is not chunks[-1])
            start += len(chunk)
        return float(loss.detach())

    def fid(self, sigmas: Tensor, seeds: list[int]) -> float:
        """FID of the samples of ``seeds`` against the reference statistics (no gradient)."""
        rows = self._detached_features(sigmas, seeds).cpu().numpy()
        return frechet_distance(
            rows.mean(0), np.cov(rows, rowvar=False), self.reference_mu, self.reference_sigma
        )


#: the settings of a KID descent a config node holds (``schedule_search.quality``, ``tune.search.quality``,
#: ``tune.search.ggdm``); the validation seeds and progress come from the job
DESCENT_SETTINGS = ("seed_offset", "samples", "iterations", "lr", "validate_every")


def descent_settings(node: Any) -> dict[str, Any]:
    """:data:`DESCENT_SETTINGS` of a config node, as keyword arguments of the searches."""
    return {name: node[name] for name in DESCENT_SETTINGS}


def iteration_seeds(offset: int, iteration: int, count: int) -> list[int]:
    """The fresh seeds of one iteration: ``count`` consecutive seeds after those of earlier iterations."""
    first = offset + iteration * count
    return list(range(first, first + count))


def quality_search(
    objective: QualityObjective,
    init: Tensor,
    *,
    sigma_floor: float,
    validation_seeds: list[int],
    seed_offset: int = 400_000,
    samples: int = 128,
    iterations: int = 40,
    lr: float = 0.05,
    validate_every: int = 5,
    progress: bool = True,
) -> tuple[Tensor, dict[str, Any]]:
    """Minimize the KID of ``objective`` over the schedule from ``init`` (Adam on the log-sigma logits).

    Returns the grid with the lowest validation FID seen (float64, ending at 0; ``init`` if no
    iterate beats it) and a report (loss and validation histories, model calls, time).
    """
    schedule = LogSigmaSchedule(init, sigma_floor)
    # The start grid itself competes (the parametrization lifts a last level that sits on the floor).
    start = torch.as_tensor(init, dtype=torch.float64).clone()
    best, report = kid_descent(
        objective,
        Descent(
            parameters=list(schedule.parameters()),
            sigmas=schedule,
            snapshot=lambda: schedule().detach().clone(),
            start=start,
            start_sigmas=start,
            trainable=objective.sampler.steps > 1,  # one step: the only level is sigma_max, nothing to move
            setting="schedule_search.quality",
            title="schedule KID",
        ),
        validation_seeds=validation_seeds,
        seed_offset=seed_offset,
        samples=samples,
        iterations=iterations,
        lr=lr,
        validate_every=validate_every,
        progress=progress,
    )
    log.info(
        "quality search: validation FID %.4g -> %.4g in %d iterations",
        report["validation_fid"][0]["fid"],
        report["best_validation_fid"],
        report["iterations"],
    )
    return best, {"init_sigmas": torch.as_tensor(init).tolist(), **report}


def learn_ggdm(
    objective: QualityObjective, sampler: GGDMSampler, **options: Any
) -> tuple[GGDMSampler, dict[str, Any]]:
    """DDSS for one budget: the GGDM sampler's coefficients (and levels, with +TIME) by Adam on the KID
    of ``objective``, from ``sampler``'s initialization (DDIM on its grid). The sampler ends with the
    parameters of the lowest validation FID seen (the start included); returns it and a report.
    ``options``: :func:`kid_descent`'s (validation_seeds, seed_offset, samples, iterations, lr,
    validate_every, progress)."""
    run_objective = dataclasses.replace(objective, sampler=sampler)
    sampler.requires_grad_(True)
    best, report = kid_descent(
        run_objective,
        Descent(
            parameters=list(sampler.parameters()),
            sigmas=sampler.sigmas,  # its own levels; the gradient reaches them inside the sampler
            snapshot=lambda: copy.deepcopy(sampler.state_dict()),
            start=copy.deepcopy(sampler.state_dict()),
            start_sigmas=sampler.sigmas(),
            trainable=True,
            setting="tune.search.ggdm",
            title="GGDM KID",
            validation_setting="tune.search.quality.validation_seeds",  # shared with the quality search
        ),
        **options,
    )
    sampler.load_state_dict(best)
    log.info(
        "GGDM: validation FID %.4g -> %.4g in %d iterations",
        report["validation_fid"][0]["fid"],
        report["best_validation_fid"],
        report["iterations"],
    )
    return sampler.requires_grad_(False), report


@dataclass
class Descent:
    """What :func:`kid_descent` optimizes: the parameters, the current grid, how to keep an iterate
    (``snapshot``), and the start iterate that competes with the others."""

    parameters: list[torch.nn.Parameter]
    sigmas: Callable[[], Tensor]
    snapshot: Callable[[], Any]
    start: Any
    start_sigmas: Tensor
    trainable: bool
    setting: str
    title: str
    validation_setting: str | None = (
        None  # where the validation seeds are set (default: <setting>.validation_seeds)
    )


def kid_descent(
    objective: QualityObjective,
    descent: Descent,
    *,
    validation_seeds: list[int],
    seed_offset: int,
    samples: int,
    iterations: int,
    lr: float,
    validate_every: int,
    progress: bool,
) -> tuple[Any, dict[str, Any]]:
    """Adam on ``descent.parameters`` against the KID of fresh seeds each iteration; every
    ``validate_every`` iterations the FID of ``validation_seeds``. Returns the kept iterate with the
    lowest validation FID (``descent.start`` if none beats it) and a report."""
    check_range(f"{descent.setting}.iterations", iterations, low=0)
    check_range(f"{descent.setting}.lr", lr, low=0, low_inclusive=False)
    check_range(f"{descent.setting}.samples", samples, low=2)
    check_range(f"{descent.setting}.validate_every", validate_every, low=1)
    if len(validation_seeds) < 2:
        where = descent.validation_setting or f"{descent.setting}.validation_seeds"
        fail(f"{where} needs at least 2 seeds (e.g. 300000-300999)")
    optimizer = torch.optim.Adam(descent.parameters, lr=lr)
    tick = time.perf_counter()
    best, best_fid = descent.start, objective.fid(descent.start_sigmas, validation_seeds)
    validation = [{"iteration": 0, "fid": best_fid}]
    losses: list[float] = []
    bar = tqdm(range(iterations if descent.trainable else 0), desc=descent.title, disable=not progress)
    for iteration in bar:
        optimizer.zero_grad()
        loss = objective.kid_backward(descent.sigmas(), iteration_seeds(seed_offset, iteration, samples))
        if not math.isfinite(loss):
            fail(
                f"{descent.title}: the KID became {loss} at iteration {iteration}; lower {descent.setting}.lr"
            )
        losses.append(loss)
        optimizer.step()
        done = iteration + 1
        if done % validate_every == 0 or done == iterations:
            sigmas = descent.sigmas().detach().clone()
            fid = objective.fid(sigmas, validation_seeds)
            validation.append({"iteration": done, "fid": fid})
            if fid < best_fid:
                best_fid, best = fid, descent.snapshot()
        bar.set_postfix(kid=f"{loss:.3g}", val_fid=f"{validation[-1]['fid']:.4g}", best=f"{best_fid:.4g}")
    bar.close()
    calls = objective.sampler.nfe * (len(losses) * samples + len(validation) * len(validation_seeds))
    return best, {
        "kid_history": [float(f"{value:.6g}") for value in losses],
        "validation_fid": validation,
        "iterations": len(losses),
        "best_validation_fid": best_fid,
        "model_calls_forward": calls,
        "wall_s": round(time.perf_counter() - tick, 2),
    }
