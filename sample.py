"""Generate samples, or search a step schedule: see conf/sample.yaml.

    python sample.py model=... sampler=... seeds=0-999                        (mode=generate)
    python sample.py mode=optimize_schedule sampler=dpmpp_2m schedule_search.nfe=5 \
        schedule_search.method=gits|ays                                       (docs/schedules.md)
"""

from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from fastsample.utils.errors import check_choice, fail, run_cli

MODES = ("generate", "optimize_schedule")


def sampling_job(cfg: DictConfig) -> dict[str, Any] | None:
    """One process (no ``trainer``, the default) or Lightning processes (``trainer=ddp_cpu|ddp|...``,
    which return ``None`` on ranks other than 0)."""
    if cfg.get("trainer"):
        from fastsample.lit.sampling import generate_distributed

        return generate_distributed(cfg)
    from fastsample.sampling import generate

    return generate(cfg)


def generate_samples(cfg: DictConfig) -> float:
    """Run the sampling job; returns images/s so sweeps can compare samplers."""
    from fastsample.tracking import log_job

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
    from fastsample.schedule_search.job import optimize_schedule
    from fastsample.tracking import log_job

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


def run(cfg: DictConfig) -> float:
    """Dispatch on ``mode``: ``generate`` (default) or ``optimize_schedule``."""
    mode = cfg.get("mode", "generate")
    run_cli(lambda: check_choice("mode", mode, MODES))
    if mode == "optimize_schedule" and cfg.get("trainer"):
        run_cli(lambda: fail("trainer= (distributed sampling) applies to mode=generate only; drop it"))
    return search_schedule(cfg) if mode == "optimize_schedule" else generate_samples(cfg)


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
def main(cfg: DictConfig) -> float:
    return run(cfg)


if __name__ == "__main__":
    main()
