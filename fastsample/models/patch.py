"""Run a backbone on 2x2 (or p x p) pixel patches: space-to-depth in, depth-to-space out.

On small images most of a UNet's cost is at full resolution; folding p x p patches into channels
first (as patch-based diffusion backbones do) cuts that cost ~p^2-fold for the same width, which
is what makes training on a CPU practical. The wrapped network sees ``C p^2`` channels at
``H / p``; the wrapper keeps the outer interface ``net(x, noise_labels, class_labels)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastsample.utils.errors import fail


class Patchify(nn.Module):
    """``net`` applied to pixel-unshuffled input, its output pixel-shuffled back."""

    def __init__(self, net: nn.Module, patch_size: int = 2) -> None:
        super().__init__()
        self.net, self.patch_size = net, patch_size
        inner = tuple(getattr(net, "input_shape", ()))
        if inner and inner[0] % patch_size**2:
            fail(f"model.net.in_channels={inner[0]} must be a multiple of patch_size^2={patch_size**2}")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        channels, height, width = self.net.input_shape
        p = self.patch_size
        return channels // p**2, height * p, width * p

    def forward(
        self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.input_shape:
            fail(f"model expects (C,H,W)={self.input_shape}, got {tuple(x.shape[1:])}")
        out = self.net(F.pixel_unshuffle(x, self.patch_size), noise_labels, class_labels)
        return F.pixel_shuffle(out, self.patch_size)
