"""What the entry points run: ``sample.py`` (:func:`sample_main`), ``evaluate.py`` (:func:`evaluate_main`)
and ``train.py`` (:func:`train_main`). Each runs its job under :func:`~fastsample.utils.errors.run_cli`
(one ``error:`` line and a non-zero exit for bad input), prints a short summary, and returns the
number sweeps optimize (images/s, a schedule's score, FID, the training metric)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from fastsample.jobs.distributed import generate_distributed
from fastsample.jobs.evaluation import evaluate, format_metrics
from fastsample.jobs.sampling import generate
from fastsample.jobs.schedule_search import optimize_schedule
from fastsample.jobs.training import train
from fastsample.lit.tracking import log_job
from fastsample.utils.errors import check_choice, fail, run_cli

SAMPLE_MODES = ("generate", "optimize_schedule")


def sampling_job(cfg: DictConfig) -> dict[str, Any] | None:
    """One process (no ``trainer``, the default) or Lightning processes (``trainer=ddp_cpu|ddp|...``,
    which return ``None`` on ranks other than 0)."""
    if cfg.get("trainer"):
        return generate_distributed(cfg)
    return generate(cfg)


def generate_samples(cfg: DictConfig) -> float:
    """Run the sampling job; returns images/s so sweeps can compare samplers."""
    summary = run_cli(lambda: sampling_job(cfg))
    if summary is None:
        return 0.0  # a rank > 0 of a distributed run: rank 0 reports and logs
    print(
        f"{summary['samples']} samples, {summary['sampler']} x {summary['steps']} steps "
        f"(NFE {summary['nfe']}) in {summary['wall_time_s']} s -> {summary['output_dir']}"
    )
    grid = Path(summary["output_dir"]) / "grid.png"
    run_cli(lambda: log_job(cfg, summary, "sample", images={"sample/grid": grid}))
    return float(summary["images_per_s"] or 0.0)


def search_schedule(cfg: DictConfig) -> float:
    """Run the schedule search; returns the mean score of the found schedules (held-out RMS, else search RMS,
    or validation FID for method=quality)."""
    scores, logged = [], {}
    for summary in run_cli(lambda: optimize_schedule(cfg)):
        where = next(name for name in ("holdout", "validation", "search") if name in summary["metrics"])
        metrics = summary["metrics"][where]
        score = "fid" if "fid" in metrics else "rms"
        measured = (
            f"validation FID {metrics['fid']:.4g} vs {metrics['baseline_fid']:.4g} with "
            f"{summary['baseline']['kind']} (seeds {metrics['seeds']})"
            if score == "fid"
            else f"RMS to the teacher {metrics['rms']:.4g} vs {metrics['baseline_rms']:.4g} with "
            f"{summary['baseline']['kind']} ({metrics['trajectories']} "
            f"{'held-out' if where == 'holdout' else 'search'} trajectories)"
        )
        sampler, steps, path = summary["sampler"], summary["steps"], summary["path"]
        print(
            f"{summary['method']} schedule for {sampler} at NFE {summary['nfe']} ({steps} steps): "
            f"{measured}\n"
            f"sigmas: {', '.join(f'{s:.4g}' for s in summary['sigmas'])}\n"
            f"written to {path}\n"
            f"use it: python sample.py sampler={sampler} sampler.steps={steps} "
            f"sampler.schedule.kind=file ++sampler.schedule.path={path}"
        )
        scores.append(float(metrics[score]))
        logged.update({f"nfe{summary['nfe']}/{key}": value for key, value in metrics.items()})
    run_cli(lambda: log_job(cfg, logged, "schedule"))
    return sum(scores) / len(scores)


def sample_main(cfg: DictConfig) -> float:
    """Dispatch on ``mode``: ``generate`` (default) or ``optimize_schedule``."""
    mode = cfg.get("mode", "generate")
    run_cli(lambda: check_choice("mode", mode, SAMPLE_MODES))
    if mode == "optimize_schedule" and cfg.get("trainer"):
        run_cli(lambda: fail("trainer= (distributed sampling) applies to mode=generate only; drop it"))
    return search_schedule(cfg) if mode == "optimize_schedule" else generate_samples(cfg)


def evaluate_main(cfg: DictConfig) -> float:
    """Run the evaluation job; returns the FID (NaN when not computed) for sweeps."""
    summary = run_cli(lambda: evaluate(cfg))
    if summary["mode"] == "ref":
        print(
            f"reference statistics: {summary['describe']} -> {summary['reference']} "
            f"({summary['wall_time_s']} s)"
        )
        return math.nan
    if summary["metrics"] is None:
        return math.nan  # a rank > 0 of a distributed run (trainer=...): rank 0 reports
    print(format_metrics(summary["metrics"]))
    print(f"metrics -> {summary['output_dir']}/metrics.json")
    return float(summary["metrics"].get("fid", math.nan))


def train_main(cfg: DictConfig) -> float | None:
    """Run training; returns the metric named by ``optimized_metric`` (for sweeps), if set."""
    metrics = run_cli(lambda: train(cfg))
    print("final metrics:", {k: round(v, 5) for k, v in metrics.items()})
    return metrics.get(cfg.get("optimized_metric")) if cfg.get("optimized_metric") else None
