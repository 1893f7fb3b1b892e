"""Exact training resume: what a checkpoint must add so a resumed run ends with the weights of an
uninterrupted one (``docs/reliability.md``; the data side is :mod:`fastsample.data.datamodule`).

Lightning restores weights, optimizer, schedulers and loop counters, and (through
:class:`~fastsample.data.datamodule.ResumableLoader`) the position in the epoch. Two things it does
not restore are kept by :class:`ResumeState`:

- the random streams the training steps draw their noise from (torch CPU and CUDA, numpy, Python):
  saved with the checkpoint, put back at the first training batch of the resumed run, after
  everything that runs before it (the sanity check, loading) has had its turn. Validation runs on a
  copy of the streams, so whether and when it runs does not change the training's noise either;
- the LightningModule's own ``on_train_batch_end`` (our EMA update): Lightning calls it *after* the
  callbacks' hooks, so a checkpoint written by ``ModelCheckpoint`` at the end of step ``k`` holds the
  EMA before step ``k``'s update. The checkpoint records that, and the resumed run makes the update
  before its first step.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

KEY = "fastsample_resume"


def random_states() -> dict[str, Any]:
    """The process's random streams (torch CPU / CUDA, numpy, Python), as tensors and plain numbers:
    Lightning loads checkpoints with ``weights_only=True``, which refuses numpy arrays."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_random_states(states: dict[str, Any]) -> None:
    """Put back streams saved by :func:`random_states`."""
    torch.set_rng_state(states["torch"])
    name, keys, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class ResumeState(pl.Callback):
    """Random streams and the pending module hook in checkpoints; validation on copied streams."""

    def __init__(self) -> None:
        self._in_batch_end = False  # between our on_train_batch_end and the next phase of the loop
        self._restore: dict[str, Any] | None = None  # streams to put back at the first resumed batch
        self._pending = False  # the module's on_train_batch_end to make before resuming
        self._validation: dict[str, Any] | None = None

    # -- saving --------------------------------------------------------------------------------------
    def on_train_batch_end(
        self, trainer: pl.Trainer, module: Any, outputs: Any, batch: Any, index: int
    ) -> None:
        # ModelCheckpoint runs after us (Lightning orders checkpoint callbacks last), the module after both
        self._in_batch_end = True

    def on_train_batch_start(self, trainer: pl.Trainer, module: Any, batch: Any, index: int) -> None:
        self._in_batch_end = False
        if self._restore is not None:  # the first batch of a resumed run: its noise as uninterrupted
            set_random_states(self._restore)
            self._restore = None

    def on_train_epoch_end(self, trainer: pl.Trainer, module: Any) -> None:
        self._in_batch_end = False

    def on_save_checkpoint(self, trainer: pl.Trainer, module: Any, checkpoint: dict[str, Any]) -> None:
        checkpoint[KEY] = {"random": random_states(), "module_batch_end_pending": self._in_batch_end}

    # -- resuming ------------------------------------------------------------------------------------
    def on_load_checkpoint(self, trainer: pl.Trainer, module: Any, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(KEY)
        if saved is None:  # a checkpoint of an older version: resume as Lightning does
            return
        self._restore = saved["random"]
        self._pending = bool(saved.get("module_batch_end_pending"))

    def on_train_start(self, trainer: pl.Trainer, module: Any) -> None:
        if self._pending:
            # the hook Lightning had not yet called on the module when the checkpoint was written
            module.on_train_batch_end(None, None, -1)
            self._pending = False

    # -- validation on a copy of the streams ----------------------------------------------------------
    def on_validation_start(self, trainer: pl.Trainer, module: Any) -> None:
        self._in_batch_end = False
        self._validation = random_states()

    def on_validation_end(self, trainer: pl.Trainer, module: Any) -> None:
        if self._validation is not None:
            set_random_states(self._validation)
            self._validation = None
