"""Low-dimensional toy data (2-D mixtures) for solver experiments and fast tests.

A *sampler* is any ``sampler(n, generator) -> (points (n, D), labels (n,))``; the data set draws all
points once at construction from a generator seeded with ``seed``, so a split is fixed by its seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.utils.data import Dataset

from fastsample.utils.errors import check_range, fail

ToySampler = Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


class ToyDataset(Dataset):
    """``size`` points drawn once from ``sampler``: items are (float32 (D,), int64 label)."""

    def __init__(self, sampler: ToySampler, size: int, seed: int = 0) -> None:
        check_range("dataset.size", size, low=1)
        generator = torch.Generator().manual_seed(seed)
        points, labels = sampler(size, generator)
        if points.ndim != 2 or len(points) != size:
            fail(f"dataset.sampler returned points of shape {tuple(points.shape)}; expected ({size}, D)")
        if labels.shape != (size,):
            fail(f"dataset.sampler returned labels of shape {tuple(labels.shape)}; expected ({size},)")
        self.points = points.float().contiguous()
        self.labels = labels.long()

    def __len__(self) -> int:
        return len(self.points)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.points[index], self.labels[index]


def ring_mixture(
    n: int, generator: torch.Generator, modes: int = 8, radius: float = 2.0, std: float = 0.05
) -> tuple[torch.Tensor, torch.Tensor]:
    """Equal-weight isotropic Gaussians on a circle; the label is the mode index.

    A stand-in default sampler: any function with the :data:`ToySampler` signature can replace it.
    """
    labels = torch.randint(modes, (n,), generator=generator)
    angles = 2 * math.pi * labels.float() / modes
    centers = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
    return centers + std * torch.randn(n, 2, generator=generator), labels
