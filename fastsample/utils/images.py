"""Image conversions and sample grids."""

from __future__ import annotations

import io
import math
import os

import numpy as np
import torch
from PIL import Image

from fastsample.utils.io import write_bytes_atomic


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Map a (N, C, H, W) batch in [-1, 1] to (N, H, W, C) uint8 (EDM's rounding)."""
    scaled = (images.detach().float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    return scaled.permute(0, 2, 3, 1).cpu().numpy()


def from_uint8(images: np.ndarray) -> torch.Tensor:
    """Inverse of :func:`to_uint8`: (N, H, W, C) uint8 to a float (N, C, H, W) batch in [-1, 1]."""
    tensor = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return tensor / 127.5 - 1


def grid(images: np.ndarray, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile (N, H, W, C) uint8 images into one (H', W', C) image, ``nrow`` images per row."""
    count, height, width, channels = images.shape
    nrow = nrow or math.ceil(math.sqrt(count))
    rows = math.ceil(count / nrow)
    canvas = np.full((rows * (height + pad) + pad, nrow * (width + pad) + pad, channels), 255, np.uint8)
    for index, image in enumerate(images):
        top = pad + (index // nrow) * (height + pad)
        left = pad + (index % nrow) * (width + pad)
        canvas[top : top + height, left : left + width] = image
    return canvas


def save_png(image: np.ndarray, path: str | os.PathLike) -> None:
    """Save one (H, W, C) uint8 image as PNG, atomically."""
    if image.shape[-1] == 1:
        image = image[..., 0]
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    write_bytes_atomic(path, buffer.getvalue())


def save_grid(images: np.ndarray, path: str | os.PathLike, nrow: int | None = None) -> None:
    """Save (N, H, W, C) uint8 images as one PNG grid, atomically."""
    save_png(grid(images, nrow), path)
