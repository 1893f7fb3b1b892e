"""Images: conversions, sample grids, and reading / checking image data (samples ``.npz`` files,
image folders) with one list of image file extensions."""

from __future__ import annotations

import io
import math
import os
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from fastsample.utils.errors import fail
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


# --------------------------------------------------------------------------------------------------
# Reading and checking image data (samples .npz files, image folders): one place, one extension list

#: image files read from folders (samples to score, ImageFolder datasets)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
#: the image array of a samples ``.npz``: ours (sample.py); OpenAI / ADM-style sample batches
SAMPLE_KEYS = ("images", "arr_0")


def shape_text(shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in shape)


def check_image_batch(batch: Any, what: str = "samples") -> tuple[int, int, int]:
    """Validate one image batch; returns its (C, H, W). Fails naming what is expected.

    Allowed: uint8 (N, H, W, C) with C in (1, 3), or float (N, C, H, W) in [-1, 1].
    """
    if not isinstance(batch, (torch.Tensor, np.ndarray)):
        fail(f"{what}: expected arrays of images, got {type(batch).__name__}")
    dtype = batch.dtype
    is_uint8 = dtype in (torch.uint8, np.uint8)
    is_float = (
        batch.is_floating_point() if isinstance(batch, torch.Tensor) else np.issubdtype(dtype, np.floating)
    )
    shape = tuple(batch.shape)
    if is_uint8:
        if len(shape) != 4 or shape[-1] not in (1, 3):
            fail(f"{what}: uint8 images must be (N, H, W, C) with C = 1 or 3, got shape {shape}")
        return shape[3], shape[1], shape[2]
    if not is_float:
        fail(
            f"{what}: images must be uint8 (N, H, W, C) in [0, 255] or float (N, C, H, W) in [-1, 1], "
            f"got dtype {dtype}"
        )
    if len(shape) != 4 or shape[1] not in (1, 3):
        fail(f"{what}: float images must be (N, C, H, W) with C = 1 or 3, in [-1, 1], got shape {shape}")
    if shape[0]:
        values = torch.as_tensor(batch)
        low, high = float(values.min()), float(values.max())
        if low >= 0.0 and high > 2.0:
            fail(
                f"{what}: float images must be in [-1, 1], got values in [{low:g}, {high:g}] "
                "(0-255 pixels? pass them as uint8 (N, H, W, C))"
            )
    return shape[1], shape[2], shape[3]


def load_npz_images(path: str | os.PathLike) -> np.ndarray:
    """The uint8 (N, H, W, C) images of a samples ``.npz``; fails naming what is missing or wrong."""
    path = Path(path)
    if not path.is_file():
        fail(f"samples={str(path)!r} does not exist; give a samples.npz (from sample.py) or an image folder")
    try:
        with np.load(path, allow_pickle=False) as data:
            key = next((k for k in SAMPLE_KEYS if k in data.files), None)
            if key is None:
                fail(
                    f"samples={str(path)!r} lacks an 'images' array "
                    f"(has: {', '.join(data.files) or 'nothing'}); "
                    "expected sample.py's samples.npz with images uint8 (N, H, W, C)"
                )
            images = data[key]
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        fail(f"samples={str(path)!r} is not a readable .npz: {err}")
    if images.dtype != np.uint8:
        fail(
            f"samples={str(path)!r}: images are {images.dtype}, expected uint8 (N, H, W, C) in [0, 255] "
            "as sample.py writes them"
        )
    check_image_batch(images, f"samples {str(path)!r}")
    return images


def list_images(folder: str | os.PathLike) -> list[Path]:
    """All image files under ``folder``, recursively, in a deterministic (sorted) order."""
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def list_image_files(path: str | os.PathLike) -> list[Path]:
    """Image files under ``path`` (recursively), sorted; fails naming the setting when there are none."""
    path = Path(path)
    if not path.is_dir():
        fail(f"samples={str(path)!r} is not a folder or a .npz file")
    files = list_images(path)
    if not files:
        fail(f"samples={str(path)!r} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def iter_folder_images(path: str | os.PathLike, batch_size: int = 250) -> Iterator[np.ndarray]:
    """uint8 (B, H, W, C) batches of the images under a folder; grayscale iff the first image is."""
    files = list_image_files(path)
    with Image.open(files[0]) as first:
        mode = "L" if first.mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB"
        size = first.size
    for start in range(0, len(files), batch_size):
        batch = []
        for file in files[start : start + batch_size]:
            try:
                with Image.open(file) as image:
                    if image.size != size:
                        fail(
                            f"image {str(file)!r} is {image.size[0]}x{image.size[1]}, but {str(files[0])!r} "
                            f"is {size[0]}x{size[1]}; all samples must have one size"
                        )
                    pixels = np.asarray(image.convert(mode))
            except OSError as err:
                fail(f"image {str(file)!r} cannot be read: {err}")
            batch.append(pixels[..., None] if pixels.ndim == 2 else pixels)
        yield np.stack(batch)
