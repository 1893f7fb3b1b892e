"""Train a model: ``python train.py task=diffusion dataset=fashion_mnist trainer=cpu`` (conf/train.yaml)."""

import hydra
from omegaconf import DictConfig

from fastsample.jobs.cli import train_main


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return train_main(cfg)


if __name__ == "__main__":
    main()
