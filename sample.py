"""Generate samples: ``python sample.py model=... sampler=... seeds=0-999`` (see conf/sample.yaml)."""

import hydra
from omegaconf import DictConfig

from fastsample.sampling import generate
from fastsample.utils.errors import run_cli


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
def main(cfg: DictConfig) -> float:
    """Run the sampling job; returns images/s so sweeps can compare samplers."""
    summary = run_cli(lambda: generate(cfg))
    print(
        f"{summary['samples']} samples, {summary['sampler']} x {summary['steps']} steps "
        f"(NFE {summary['nfe']}) in {summary['wall_time_s']} s -> {summary['output_dir']}"
    )
    return float(summary["images_per_s"] or 0.0)


if __name__ == "__main__":
    main()
