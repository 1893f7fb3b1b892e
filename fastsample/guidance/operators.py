"""Linear measurement operators of inverse problems: ``y = A(x)`` and the pseudo-inverse ``A^+``.

Each operator knows the measurement shape it produces for a data shape (so a measurement of the wrong
shape is refused with the expected one) and projects a state onto ``{x : A x = y}`` with
``x + A^+ (y - A x)`` (``A A^+ = I`` for all three, so the projection satisfies the measurement
exactly).

* :class:`MaskOperator` (inpainting): ``A x = m * x`` with ``m`` 1 on observed, 0 on missing pixels.
* :class:`GrayscaleOperator` (colorization): ``A x = sum_c w_c x_c`` (ITU-R BT.601 luma weights).
* :class:`DownsampleOperator` (super-resolution): ``A x`` = average pooling by an integer factor;
  ``A^+`` is nearest-neighbour upsampling.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import Tensor

from fastsample.utils.errors import check_choice, check_range, fail

MASKS = ("center", "left", "right", "top", "bottom", "random")
LUMA = (0.299, 0.587, 0.114)


class LinearOperator:
    """``A``: data (B, *data_shape) -> measurements (B, *measurement_shape(data_shape))."""

    name = "operator"

    def __call__(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def pinv(self, y: Tensor) -> Tensor:
        """The pseudo-inverse ``A^+ y`` (data shape)."""
        raise NotImplementedError

    def measurement_shape(self, data_shape: Sequence[int]) -> tuple[int, ...]:
        raise NotImplementedError

    def check_data(self, data_shape: Sequence[int]) -> None:
        """Fail clearly when the operator cannot act on data of ``data_shape``."""
        self.measurement_shape(data_shape)

    def project(self, x: Tensor, y: Tensor) -> Tensor:
        """The nearest state satisfying the measurement: ``x + A^+ (y - A x)``."""
        return x + self.pinv(y - self(x))

    def check_measurement(self, y: Tensor, data_shape: Sequence[int], batch: int | None = None) -> None:
        """Fail unless ``y`` is a batch of measurements of data of shape ``data_shape``."""
        expected = self.measurement_shape(data_shape)
        got = tuple(y.shape[1:])
        if y.ndim < 1 or got != expected or (batch is not None and y.shape[0] != batch):
            rows = f"{batch}, " if batch is not None else "B, "
            fail(
                f"guidance measurement has shape {tuple(y.shape)} but {self.name} of data "
                f"{tuple(data_shape)} gives ({rows}{', '.join(map(str, expected))})"
            )

    def describe(self) -> dict[str, Any]:
        return {"operator": self.name}


def _image_shape(what: str, data_shape: Sequence[int]) -> tuple[int, int, int]:
    if len(data_shape) != 3:
        fail(f"{what} works on images (C, H, W); the model's data shape is {tuple(data_shape)}")
    return tuple(int(s) for s in data_shape)  # type: ignore[return-value]


# -- inpainting -------------------------------------------------------------------------------------


def named_mask(name: str, data_shape: Sequence[int], size: float = 0.5, seed: int = 0) -> Tensor:
    """A (1, H, W) float mask, 1 = observed: ``name`` says which region is *missing*.

    ``center``: a centered square of side ``size * min(H, W)``; ``left`` / ``right`` / ``top`` /
    ``bottom``: that fraction ``size`` of the image; ``random``: each pixel missing with probability
    ``size`` (seeded, the same for every sample).
    """
    check_choice("guidance.mask", name, MASKS)
    check_range("guidance.mask_size", size, low=0, high=1, low_inclusive=False, high_inclusive=False)
    _, height, width = _image_shape(f"guidance.mask={name}", data_shape)
    mask = torch.ones(1, height, width)
    if name == "center":
        side_h, side_w = max(1, round(size * height)), max(1, round(size * width))
        top, left = (height - side_h) // 2, (width - side_w) // 2
        mask[:, top : top + side_h, left : left + side_w] = 0
    elif name == "left":
        mask[..., : max(1, round(size * width))] = 0
    elif name == "right":
        mask[..., width - max(1, round(size * width)) :] = 0
    elif name == "top":
        mask[:, : max(1, round(size * height))] = 0
    elif name == "bottom":
        mask[:, height - max(1, round(size * height)) :] = 0
    else:
        generator = torch.Generator().manual_seed(seed)
        mask = (torch.rand(1, height, width, generator=generator) >= size).float()
    return mask


def read_mask(source: Any) -> Tensor:
    """A mask given as an array / nested list / tensor, or a ``.npy`` / ``.pt`` file."""
    if OmegaConf.is_config(source):
        source = OmegaConf.to_container(source)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            fail(f"guidance.mask={str(source)!r} is neither a mask name ({', '.join(MASKS)}) nor a file")
        if path.suffix == ".npy":
            return torch.from_numpy(np.load(path)).float()
        if path.suffix in (".pt", ".pth"):
            return torch.as_tensor(torch.load(path, weights_only=True)).float()
        fail(f"guidance.mask={str(source)!r}: mask files must be .npy or .pt")
    try:
        return torch.as_tensor(np.asarray(source, dtype=np.float32))
    except (TypeError, ValueError) as err:
        fail(f"guidance.mask is not an array of 0 / 1 values ({err})")


class MaskOperator(LinearOperator):
    """Inpainting: ``A x = m * x`` (1 = observed pixel). ``A^+ = A`` (an orthogonal projection).

    ``mask`` is a name of :data:`MASKS` (built for the data shape on first use), or an array / file
    of 0 / 1 values shaped like the data, like one image plane ``(H, W)`` / ``(1, H, W)``, which is
    shared by all channels.
    """

    name = "inpainting"

    def __init__(self, mask: Any = "center", size: float = 0.5, seed: int = 0) -> None:
        self.spec, self.size, self.seed = mask, float(size), int(seed)
        if isinstance(mask, str) and mask in MASKS:
            check_range("guidance.mask_size", size, low=0, high=1, low_inclusive=False, high_inclusive=False)
            self.given: Tensor | None = None
        else:
            self.given = read_mask(mask)
            if bool(((self.given != 0) & (self.given != 1)).any()):
                fail("guidance.mask must hold only 0 (missing) and 1 (observed) values")
        self._cache: dict[tuple[int, ...], Tensor] = {}

    def mask_for(self, data_shape: Sequence[int]) -> Tensor:
        """The mask broadcast to ``data_shape`` (checked), as a float tensor of that shape."""
        data_shape = tuple(int(s) for s in data_shape)
        if data_shape not in self._cache:
            mask = (
                self.given
                if self.given is not None
                else named_mask(self.spec, data_shape, self.size, self.seed)
            )
            allowed = (
                {data_shape, data_shape[1:], (1, *data_shape[1:])} if len(data_shape) == 3 else {data_shape}
            )
            if tuple(mask.shape) not in allowed:
                shapes = " or ".join(str(s) for s in sorted(allowed, key=len))
                fail(
                    f"guidance.mask has shape {tuple(mask.shape)} but the data is {data_shape}; give {shapes}"
                )
            if mask.ndim < len(data_shape):
                mask = mask.unsqueeze(0)
            self._cache[data_shape] = mask.expand(data_shape).float()
        return self._cache[data_shape]

    def measurement_shape(self, data_shape: Sequence[int]) -> tuple[int, ...]:
        self.mask_for(data_shape)
        return tuple(int(s) for s in data_shape)

    def __call__(self, x: Tensor) -> Tensor:
        return x * self.mask_for(x.shape[1:]).to(x)

    def pinv(self, y: Tensor) -> Tensor:
        return y * self.mask_for(y.shape[1:]).to(y)

    def describe(self) -> dict[str, Any]:
        spec = self.spec if isinstance(self.spec, str) else "array"
        return {"operator": self.name, "mask": spec, "mask_size": self.size}


# -- colorization -----------------------------------------------------------------------------------


class GrayscaleOperator(LinearOperator):
    """Colorization: RGB (3, H, W) -> luma (1, H, W), ``y = sum_c w_c x_c``; ``A^+ y = w y / |w|^2``."""

    name = "colorization"

    def __init__(self, weights: Sequence[float] = LUMA) -> None:
        if len(weights) != 3 or not any(float(w) for w in weights):
            fail(f"guidance.weights={list(weights)} must be 3 channel weights, not all zero")
        self.weights = torch.tensor([float(w) for w in weights])

    def measurement_shape(self, data_shape: Sequence[int]) -> tuple[int, ...]:
        channels, height, width = _image_shape("guidance=colorize", data_shape)
        if channels != 3:
            fail(f"guidance=colorize needs RGB data (3 channels); the model makes {tuple(data_shape)}")
        return (1, height, width)

    def __call__(self, x: Tensor) -> Tensor:
        self.measurement_shape(x.shape[1:])
        return (x * self.weights.to(x).reshape(1, 3, 1, 1)).sum(dim=1, keepdim=True)

    def pinv(self, y: Tensor) -> Tensor:
        w = self.weights.to(y)
        return y * (w / w.pow(2).sum()).reshape(1, 3, 1, 1)

    def describe(self) -> dict[str, Any]:
        return {"operator": self.name, "weights": self.weights.tolist()}


# -- super-resolution -------------------------------------------------------------------------------


class DownsampleOperator(LinearOperator):
    """Super-resolution: average pooling by ``factor``, (C, H, W) -> (C, H/f, W/f).

    ``A^+`` is nearest-neighbour upsampling (``A A^+ = I``).
    """

    name = "super-resolution"

    def __init__(self, factor: int = 2) -> None:
        if int(factor) != factor:
            fail(f"guidance.factor={factor!r} must be an integer >= 2")
        check_range("guidance.factor", int(factor), low=2)
        self.factor = int(factor)

    def measurement_shape(self, data_shape: Sequence[int]) -> tuple[int, ...]:
        channels, height, width = _image_shape("guidance=superres", data_shape)
        if height % self.factor or width % self.factor:
            fail(
                f"guidance.factor={self.factor} does not divide the image size {height}x{width}; "
                f"use a factor that divides both"
            )
        return (channels, height // self.factor, width // self.factor)

    def __call__(self, x: Tensor) -> Tensor:
        self.measurement_shape(x.shape[1:])
        return F.avg_pool2d(x, self.factor)

    def pinv(self, y: Tensor) -> Tensor:
        return y.repeat_interleave(self.factor, dim=-2).repeat_interleave(self.factor, dim=-1)

    def describe(self) -> dict[str, Any]:
        return {"operator": self.name, "factor": self.factor}
