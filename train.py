"""Train a model: ``python train.py task=diffusion dataset=fashion_mnist trainer=cpu`` (conf/train.yaml)."""

import hydra
from omegaconf import DictConfig

from fastsample.training import train
from fastsample.utils.errors import run_cli


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Run training; returns the metric named by ``optimized_metric`` (for sweeps), if set."""
    metrics = run_cli(lambda: train(cfg))
    print("final metrics:", {k: round(v, 5) for k, v in metrics.items()})
    return metrics.get(cfg.get("optimized_metric")) if cfg.get("optimized_metric") else None


if __name__ == "__main__":
    main()
