"""Exponential moving average of weights, on top of ``torch.optim.swa_utils.AveragedModel``."""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


def ema_with_warmup(decay: float):
    """An ``AveragedModel`` multi-average function whose decay ramps up as ``(1 + n) / (10 + n)``.

    The ramp keeps the average from being dominated by the random initial weights in short runs.
    """

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        steps = int(num_averaged)
        rate = min(decay, (1 + steps) / (10 + steps))
        torch._foreach_lerp_(averaged, current, 1 - rate)

    return update


def make_ema(model: nn.Module, decay: float) -> AveragedModel:
    """An EMA copy of ``model`` (buffers averaged too)."""
    return AveragedModel(model, multi_avg_fn=ema_with_warmup(decay), use_buffers=True)
