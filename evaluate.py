"""Evaluate samples: ``python evaluate.py mode=ref|score|generate ...`` (see conf/evaluate.yaml)."""

import math

import hydra
from omegaconf import DictConfig

from fastsample.evaluation import evaluate, format_metrics
from fastsample.utils.errors import run_cli


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> float:
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


if __name__ == "__main__":
    main()
