"""Tensor image transforms shared by every dataset builder.

Images travel as (..., C, H, W) tensors: uint8 in [0, 255] while stored (4x less memory than float)
or float in [-1, 1]. Each transform keeps the dtype it was given, so a builder can resize a whole
uint8 array once at construction and convert to float per item.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastsample.utils.errors import check_choice

# ITU-R 601-2 luma weights, the ones PIL's convert("L") uses, so grayscale matches PIL.
_LUMA = (0.299, 0.587, 0.114)
_CHUNK = 4096  # images per interpolate call: bounds the float copy of a large uint8 array


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """Map uint8 images in [0, 255] to float32 in [-1, 1]; float images pass through as float32."""
    if images.dtype == torch.uint8:
        return images.float() / 127.5 - 1
    return images.float()


def _restore_dtype(images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round float results back to uint8 when the input was uint8."""
    if dtype == torch.uint8:
        return images.round().clamp(0, 255).to(torch.uint8)
    return images.to(dtype)


def resize_center_crop(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """Resize (..., C, H, W) so the shorter side is ``resolution``, then center-crop to a square.

    Antialiased bilinear (not bicubic) so float images in [-1, 1] never overshoot the range.
    """
    height, width = images.shape[-2:]
    if height == width == resolution:
        return images
    scale = resolution / min(height, width)
    new_h, new_w = max(resolution, round(height * scale)), max(resolution, round(width * scale))
    lead = images.shape[:-3]
    flat = images.reshape(-1, *images.shape[-3:])
    chunks = [
        F.interpolate(chunk.float(), size=(new_h, new_w), mode="bilinear", antialias=True)
        for chunk in flat.split(_CHUNK)
    ]
    resized = _restore_dtype(torch.cat(chunks), images.dtype)
    top, left = (new_h - resolution) // 2, (new_w - resolution) // 2
    cropped = resized[..., top : top + resolution, left : left + resolution]
    return cropped.reshape(*lead, *cropped.shape[-3:]).contiguous()


def convert_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    """Convert (..., C, H, W) between grayscale (1) and RGB (3) channels."""
    check_choice("dataset.channels", channels, (1, 3))
    have = images.shape[-3]
    if have == channels:
        return images
    if have == 1:
        return images.expand(*images.shape[:-3], 3, *images.shape[-2:]).contiguous()
    weights = torch.tensor(_LUMA).view(3, 1, 1)
    gray = (images.float() * weights).sum(dim=-3, keepdim=True)
    return _restore_dtype(gray, images.dtype)
