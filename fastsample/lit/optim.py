"""The optimizer every LightningModule of ``train.py`` uses: Adam with an optional learning-rate schedule.

:func:`configure_optimizers` is what the modules' ``configure_optimizers`` hooks return; the schedule
is :func:`lr_factor` per optimizer step (linear warm-up, then constant or cosine decay to 0).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from functools import partial
from typing import Any

import torch

LR_SCHEDULES = ("constant", "cosine")


def lr_factor(step: int, warmup: int = 0, total: float | None = None) -> float:
    """Learning-rate multiplier at ``step``: linear warm-up, then 1 or (``total`` set) cosine to 0."""
    ramp = min(1.0, (step + 1) / warmup) if warmup else 1.0
    if total is None or not math.isfinite(total) or total <= warmup:
        return ramp
    progress = min(1.0, (step - warmup) / (total - warmup)) if step >= warmup else 0.0
    return ramp * 0.5 * (1 + math.cos(math.pi * progress))


def configure_optimizers(
    module: Any,
    params: Iterable[Any],
    *,
    lr: float,
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
    lr_schedule: str = "constant",
) -> Any:
    """Adam over ``params`` (tensors or parameter groups); a linear warm-up over ``warmup_steps``, then
    constant or (``lr_schedule="cosine"``) cosine decay to 0 at the end of ``module``'s training.

    Returns the optimizer alone when there is no schedule, else Lightning's optimizer + per-step
    scheduler dictionary.
    """
    optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if not warmup_steps and lr_schedule == "constant":
        return optimizer
    # the cosine needs the run's length; only the trainer knows it (max_steps or epochs x batches)
    total = module.trainer.estimated_stepping_batches if lr_schedule == "cosine" else None
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, warmup=warmup_steps, total=total)
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
