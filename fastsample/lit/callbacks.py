"""Training callbacks: sample grids from the EMA model every N steps; a progress bar over the whole run
in optimizer steps (:class:`StepProgressBar`, installed by :func:`make_trainer`)."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks.progress import ProgressBar, TQDMProgressBar
from tqdm.contrib.logging import logging_redirect_tqdm

from fastsample.samplers import Sampler
from fastsample.utils.images import grid, save_png, to_uint8
from fastsample.utils.seeding import SeedNoise

log = logging.getLogger(__name__)


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


# --------------------------------------------------------------------------------------------------
# Progress: one bar in optimizer steps for the whole run, and log lines a redirected run can read


def _format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class StepProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, counting optimizer steps up to ``max_steps`` for the whole run.

    Our trainers set ``max_epochs=-1`` and stop at ``max_steps``; Lightning's own bars count batches of
    the current epoch (its rich bar reads "Epoch 0/-2"), so neither shows how far the run is or when it
    ends. This bar shows ``step / max_steps`` with the ETA (a resumed run starts at its step), and every
    ``log_fraction`` of the run writes a log line (``<run>/train.log``) with the step, elapsed time, ETA
    and the logged losses. The validation bar is Lightning's.
    """

    def __init__(self, refresh_rate: int = 1, log_fraction: float = 0.1) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self.log_fraction = log_fraction
        self._start: tuple[float, int] = (0.0, 0)
        self._next_log, self._logged_step = 0, -1
        self._redirect = contextlib.ExitStack()

    @staticmethod
    def total_steps(trainer: pl.Trainer) -> int | None:
        """``max_steps``, else epochs x optimizer steps per epoch when both are finite, else None."""
        if trainer.max_steps is not None and trainer.max_steps > 0:
            return int(trainer.max_steps)
        batches = trainer.num_training_batches
        if trainer.max_epochs is not None and trainer.max_epochs > 0 and math.isfinite(batches):
            return int(trainer.max_epochs * math.ceil(batches / max(trainer.accumulate_grad_batches, 1)))
        return None

    def on_train_start(self, trainer: pl.Trainer, *_: Any) -> None:
        bar = self.train_progress_bar = self.init_train_tqdm()
        total, step = self.total_steps(trainer), trainer.global_step
        bar.reset(total=total)
        bar.initial = bar.n = bar.last_print_n = step  # a resumed run: the rate counts this run's steps
        bar.set_description("training steps")
        self._start, self._next_log = (time.perf_counter(), step), self._next_milestone(step, total)
        if trainer.is_global_zero:  # log lines through the bar, not across it
            self._redirect.enter_context(logging_redirect_tqdm())
            log.info("training to step %s (from step %d)", total or "?", step)

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        """One bar for the whole run: nothing restarts at an epoch boundary."""

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        bar, step = self.train_progress_bar, trainer.global_step
        due = step % self.refresh_rate == 0 or step == bar.total
        if not bar.disable and step != bar.n and due:
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=True)
        if trainer.is_global_zero and step >= self._next_log:
            self._log_progress(trainer, step, bar.total)
            self._next_log = self._next_milestone(step, bar.total)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_train_end(self, trainer: pl.Trainer, *_: Any) -> None:
        super().on_train_end(trainer)
        if trainer.is_global_zero and trainer.global_step != self._logged_step:
            self._log_progress(trainer, trainer.global_step, trainer.global_step)
        self._redirect.close()

    def _next_milestone(self, step: int, total: int | None) -> int:
        """The next multiple of ``log_fraction`` of the run (every 1000 steps without a total) after
        ``step``; a resumed run logs at the same steps an uninterrupted one does."""
        interval = max(1, int(total * self.log_fraction)) if total else 1000
        return (step // interval + 1) * interval

    def _log_progress(self, trainer: pl.Trainer, step: int, total: int | None) -> None:
        started, first = self._start
        self._logged_step = step
        elapsed = time.perf_counter() - started
        done = step - first
        eta = (total - step) * elapsed / done if total and done > 0 else None
        losses = {
            name: float(value)
            for name, value in trainer.callback_metrics.items()
            if "loss" in name and getattr(value, "numel", lambda: 0)() == 1
        }
        log.info(
            "step %d/%s, %s elapsed%s%s",
            step,
            total or "?",
            _format_seconds(elapsed),
            f", ETA {_format_seconds(eta)}" if eta is not None else "",
            "".join(f", {name} {value:.4g}" for name, value in sorted(losses.items())),
        )


def make_trainer(**settings: Any) -> pl.Trainer:
    """``pl.Trainer(**settings)`` with :class:`StepProgressBar` as its bar (``conf/trainer``'s target).

    Kept as Lightning decides when the settings turn bars off (``enable_progress_bar=false``) or the
    callbacks already hold a progress bar.
    """
    callbacks = list(settings.pop("callbacks", None) or [])
    wants_bar = settings.get("enable_progress_bar", True) is not False
    if wants_bar and not any(isinstance(callback, ProgressBar) for callback in callbacks):
        callbacks.append(StepProgressBar())
    return pl.Trainer(callbacks=callbacks, **settings)
