"""Evaluate samples: ``python evaluate.py mode=ref|score|generate ...`` (see conf/evaluate.yaml)."""

import hydra
from omegaconf import DictConfig

from fastsample.jobs.cli import evaluate_main


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> float:
    return evaluate_main(cfg)


if __name__ == "__main__":
    main()
