"""Schedule optimization for sample quality (fastsample.schedule_search.quality, method=quality)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from fastsample.diffusion.schedules import ScheduleSpec, make_sigmas
from fastsample.jobs.schedule_search import optimize_schedule
from fastsample.metrics.feature_loss import pixel_features
from fastsample.samplers import Sampler
from fastsample.schedule_search import LogSigmaSchedule, QualityObjective, quality_search
from fastsample.schedule_search.quality import iteration_seeds
from fastsample.utils.errors import UserError
from fastsample.utils.seeding import SeedNoise

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("single_thread")
DATA_STD = 0.3


class GaussianDenoiser(nn.Module):
    """The exact denoiser of N(0, DATA_STD^2 I): D(x, sigma) = x s^2 / (s^2 + sigma^2)."""

    sigma_min, sigma_max = 0.01, 80.0

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **_: object) -> torch.Tensor:
        sigma = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        return x * DATA_STD**2 / (DATA_STD**2 + sigma**2)


def gaussian_objective(batch_size: int = 64, steps: int = 2) -> QualityObjective:
    real = DATA_STD * SeedNoise(range(10_000, 12_000)).randn((4,), dtype=torch.float64)
    rows = real.numpy()
    return QualityObjective(
        sampler=Sampler("dpmpp_2m", steps),
        model=GaussianDenoiser(),
        features=pixel_features(),
        real_features=real,
        reference_mu=rows.mean(0),
        reference_sigma=np.cov(rows, rowvar=False),
        shape=(4,),
        batch_size=batch_size,
        dtype=torch.float64,
    )


def karras(steps: int) -> torch.Tensor:
    return make_sigmas(ScheduleSpec(kind="karras", sigma_min=0.01, sigma_max=80.0), steps, None)


def test_chunked_backward_gives_the_gradient_of_the_whole_batch():
    """More samples than batch_size: the loss gradient is pushed back chunk by chunk, exactly."""
    grads = []
    for batch_size in (96, 32, 40):
        schedule = LogSigmaSchedule(karras(3), sigma_floor=0.01)
        loss = gaussian_objective(batch_size, steps=3).kid_backward(schedule(), list(range(96)))
        grads.append((loss, schedule.logits.grad.clone()))
    (loss, whole), *chunked = grads
    for other_loss, grad in chunked:
        assert other_loss == pytest.approx(loss, rel=1e-12)
        assert torch.allclose(grad, whole, rtol=1e-9, atol=1e-15)
    assert whole.abs().sum() > 0


def test_quality_search_finds_the_best_middle_level():
    """Two DPM-Solver++ steps on Gaussian data: the output spread depends only on the middle level
    (Karras' 0.44 shrinks the samples more than needed); the search must find the level that a dense
    scan of its FID finds best."""
    objective = gaussian_objective()
    validation = list(range(50_000, 51_000))
    init = karras(2)
    sigmas, report = quality_search(
        objective,
        init,
        sigma_floor=0.01,
        validation_seeds=validation,
        samples=256,
        iterations=40,
        lr=0.3,
        validate_every=10,
        progress=False,
    )
    assert bool((sigmas[:-1] > sigmas[1:]).all()) and float(sigmas[-1]) == 0.0 and float(sigmas[0]) == 80.0
    start, best = report["validation_fid"][0]["fid"], report["best_validation_fid"]
    assert objective.fid(sigmas, validation) == pytest.approx(best, rel=1e-9)  # the best grid is returned
    scan = [
        torch.tensor([80.0, float(level), 0.0], dtype=torch.float64) for level in torch.logspace(-2, 1, 61)
    ]
    scanned = min(objective.fid(grid, validation) for grid in scan)
    assert best <= 1.01 * scanned and best < 0.4 * start
    assert report["model_calls_forward"] == 2 * (40 * 256 + 5 * 1000)


def test_quality_search_keeps_the_start_grid_when_nothing_beats_it():
    objective = gaussian_objective()
    init = karras(2)
    sigmas, report = quality_search(
        objective, init, sigma_floor=0.01, validation_seeds=list(range(100)), iterations=0, progress=False
    )
    assert torch.allclose(sigmas, init, rtol=1e-9) and report["iterations"] == 0


def test_iteration_seeds_never_repeat():
    seen = [iteration_seeds(400_000, i, 16) for i in range(4)]
    assert seen[0] == list(range(400_000, 400_016))
    assert len({s for batch in seen for s in batch}) == 64


def test_quality_search_refuses_bad_settings():
    objective = gaussian_objective()
    with pytest.raises(UserError, match="validation_seeds"):
        quality_search(objective, karras(2), sigma_floor=0.01, validation_seeds=[1], progress=False)
    with pytest.raises(UserError, match="schedule_search.quality.samples"):
        quality_search(
            objective, karras(2), sigma_floor=0.01, validation_seeds=[1, 2], samples=1, progress=False
        )


def test_quality_method_end_to_end_on_pixel_features(tmp_path):
    """The job on the digits mixture: no teacher, features from the features group, validation FID."""
    overrides = [
        "model=gmm_digits",
        "dataset=digits",
        "class_labels=cycle",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"output_dir={tmp_path}",
        "device=cpu",
        "mode=optimize_schedule",
        "schedule_search.progress=false",
        "schedule_search.method=quality",
        "schedule_search.nfe=3",
        "schedule_search.quality.iterations=4",
        "schedule_search.quality.samples=32",
        "schedule_search.quality.validation_seeds=0-63",
        "schedule_search.quality.validate_every=2",
        "features@schedule_search.quality.features=pixels",
    ]
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("sample", overrides=overrides)
    (summary,) = optimize_schedule(cfg)
    validation = summary["metrics"]["validation"]
    assert set(summary["metrics"]) == {"validation"} and validation["seeds"] == "0-63"
    report = summary["report"]
    assert report["iterations"] == 4 and [row["iteration"] for row in report["validation_fid"]] == [0, 2, 4]
    assert validation["fid"] == min(row["fid"] for row in report["validation_fid"])
    assert summary["trajectories"] == 0 and summary["holdout_seeds"] is None
    assert len(summary["sigmas"]) == 4 and summary["sigmas"][-1] == 0.0
