"""What the entry points run: ``sample.py`` (:func:`sample_main`), ``evaluate.py`` (:func:`evaluate_main`)
and ``train.py`` (:func:`train_main`). Each runs its job under :func:`~fastsample.utils.errors.run_cli`
(one ``error:`` line and a non-zero exit for bad input), prints a short summary, and returns the
number sweeps optimize (images/s, a schedule's score, FID, the training metric)."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from fastsample.jobs.distributed import generate_distributed
from fastsample.jobs.evaluation import evaluate, format_metrics
from fastsample.jobs.sampling import generate
from fastsample.jobs.schedule_search import optimize_schedule
from fastsample.jobs.schema import validate
from fastsample.jobs.training import train
from fastsample.jobs.tuning import candidate_table, tune
from fastsample.lit.tracking import log_job
from fastsample.utils.errors import check_choice, fail, run_cli
from fastsample.utils.quiet import quiet_third_party

SAMPLE_MODES = ("generate", "optimize_schedule", "tune")


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
        if summary.get("warning"):  # worse than the configured schedule: not the result (schedule_search.py)
            print(f"warning: {summary['warning']}", file=sys.stderr)
        use = "use it" if summary["verdict"]["recommended"] == "searched" else "keep the configured schedule"
        print(
            f"{summary['method']} schedule for {sampler} at NFE {summary['nfe']} ({steps} steps): "
            f"{measured}\n"
            f"sigmas: {', '.join(f'{s:.4g}' for s in summary['sigmas'])}\n"
            f"written to {path}\n"
            f"{use}: {summary['command']}"
        )
        scores.append(float(metrics[score]))
        logged.update({f"nfe{summary['nfe']}/{key}": value for key, value in metrics.items()})
    run_cli(lambda: log_job(cfg, logged, "schedule"))
    return sum(scores) / len(scores)


def tune_sampler(cfg: DictConfig) -> float:
    """Run the tuner (docs/tuning.md); prints each budget's candidate table; returns the mean held-out
    FID of the selected samplers in the first report space."""
    summaries = run_cli(lambda: tune(cfg))
    held_out = []
    for summary in summaries:
        best, timing = summary["best"], summary["timing"]
        report = best.report["fid"]
        label = next(iter(report))
        print(candidate_table(summary, label))
        print(
            f"NFE {summary['nfe']}: {best.key} ({best.sampler.steps} steps), held-out "
            + ", ".join(f"{space} FID {scores['fid']:.4g}" for space, scores in report.items())
            + f"; {timing['wall_s']} s wall, {timing['cpu_s']} s CPU\n"
            f"written to {summary['path']}\n"
            f"use it: python sample.py sampler=tuned sampler.path={summary['path']}"
        )
        held_out.append(report[label]["fid"])
    return sum(held_out) / len(held_out)


def sample_main(cfg: DictConfig) -> float:
    """Dispatch on ``mode``: ``generate`` (default), ``optimize_schedule`` or ``tune``."""
    quiet_third_party()
    run_cli(lambda: validate(cfg, "sample"))  # typed settings, before anything runs
    mode = cfg.get("mode", "generate")
    run_cli(lambda: check_choice("mode", mode, SAMPLE_MODES))
    if mode != "generate" and cfg.get("trainer"):
        run_cli(lambda: fail("trainer= (distributed sampling) applies to mode=generate only; drop it"))
    if mode == "tune":
        return tune_sampler(cfg)
    return search_schedule(cfg) if mode == "optimize_schedule" else generate_samples(cfg)


def evaluate_main(cfg: DictConfig) -> float:
    """Run the evaluation job; returns the FID (NaN when not computed) for sweeps."""
    quiet_third_party()
    run_cli(lambda: validate(cfg, "evaluate"))
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
    quiet_third_party()
    run_cli(lambda: validate(cfg, "train"))
    metrics = run_cli(lambda: train(cfg))
    print("final metrics:", {k: round(v, 5) for k, v in metrics.items()})
    return metrics.get(cfg.get("optimized_metric")) if cfg.get("optimized_metric") else None
