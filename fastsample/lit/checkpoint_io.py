"""Checkpoint files that are never partial: Lightning's checkpoint IO through :mod:`fastsample.utils.io`.

Lightning's ``TorchCheckpointIO`` stages a checkpoint in the system temporary folder and moves it into
place: when that folder is on another file system (``/tmp`` as tmpfs) the move is a copy, so a job
killed during it leaves a truncated ``last.ckpt`` under its final name, and the file is never fsynced.
:class:`AtomicCheckpointIO` writes beside the final name, fsyncs and renames instead; a full disk is a
one-line error naming the checkpoint.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from fastsample.utils.io import atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves are atomic in the checkpoint's own folder (local paths)."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
    ) -> None:
        if storage_options is not None or "://" in str(path):  # remote / custom storage: Lightning's way
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)
