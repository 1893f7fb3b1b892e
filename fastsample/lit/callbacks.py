"""Training callbacks: sample grids from the EMA model every N steps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from fastsample.samplers import Sampler
from fastsample.utils.images import grid, save_png, to_uint8
from fastsample.utils.seeding import SeedNoise


class SampleGrid(pl.Callback):
    """Every ``every_n_steps`` steps, sample fixed seeds with the EMA denoiser and save / log a grid.

    Does nothing for modules without a ``denoiser()`` (e.g. the classifier task), so the default
    callback set works for every task.
    """

    def __init__(
        self,
        every_n_steps: int = 1000,
        seeds: int = 64,
        sampler: str = "heun",
        steps: int = 18,
        output_dir: str | None = None,
    ) -> None:
        self.every_n_steps, self.seeds, self.output_dir = every_n_steps, seeds, output_dir
        self.sampler = Sampler(sampler, steps)

    def on_train_batch_end(
        self, trainer: pl.Trainer, module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.every_n_steps <= 0 or step % self.every_n_steps or not trainer.is_global_zero:
            return
        if not callable(getattr(module, "denoiser", None)):
            return  # a task without a generative model (e.g. task=classifier): nothing to sample
        image = self.sample_grid(module)
        directory = Path(self.output_dir or trainer.default_root_dir) / "grids"
        save_png(image, directory / f"step-{step:07d}.png")
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):  # W&B
                logger.log_image(key="train/samples", images=[image], step=step)
            elif hasattr(getattr(logger, "experiment", None), "add_image"):  # TensorBoard
                logger.experiment.add_image("train/samples", image, step, dataformats="HWC")

    @torch.no_grad()
    def sample_grid(self, module: Any) -> np.ndarray:
        """A grid of samples for seeds 0..seeds-1 (class labels cycle when conditional)."""
        denoiser = module.denoiser(ema=True)
        seeds = list(range(self.seeds))
        noise = SeedNoise(seeds)
        cond = None
        if module.num_classes:
            cond = {
                "class_labels": torch.tensor([s % module.num_classes for s in seeds], device=module.device)
            }
        shape = module.image_shape
        images = self.sampler.sample(
            denoiser, noise.randn(shape, device=module.device), cond=cond, generator=noise
        )
        return grid(to_uint8(images), nrow=int(np.ceil(np.sqrt(len(seeds)))))
