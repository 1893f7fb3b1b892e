"""The one interface every model is wrapped into: ``D(x, sigma, **cond) -> x0_hat``.

Convention (EDM / k-diffusion "sigma space"): a noisy state is ``x = x0 + sigma * eps`` and the
probability-flow ODE is ``dx/dsigma = (x - D(x, sigma)) / sigma``. Samplers only ever see this
form, so a backbone's parametrization (eps / x0 / v prediction, EDM preconditioning, an analytic
mixture) is adapted exactly once, here or in :mod:`fastsample.diffusion.discrete`.

Denoisers are ``nn.Module`` s so they move across devices, stay differentiable (guidance
gradients, DDSS) and are batch-agnostic: ``sigma`` may be a Python float, a 0-d tensor or a
``(B,)`` tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from fastsample.utils.errors import fail


def expand_sigma(sigma: Tensor | float, x: Tensor) -> Tensor:
    """Return ``sigma`` as a ``(B,)`` tensor on ``x``'s device and dtype."""
    sigma = torch.as_tensor(sigma, device=x.device, dtype=x.dtype)
    if sigma.ndim == 0:
        return sigma.expand(x.shape[0])
    return sigma.reshape(x.shape[0])


def append_dims(values: Tensor, ndim: int) -> Tensor:
    """Append singleton dimensions to ``values`` until it has ``ndim`` dimensions (broadcasting)."""
    return values.reshape(values.shape + (1,) * (ndim - values.ndim))


class Denoiser(nn.Module):
    """Base class of every denoiser ``D(x, sigma, **cond) -> x0_hat``.

    Subclasses implement :meth:`denoise` on a ``(B,)`` sigma and set the attributes that
    schedules and entry points read: the trained sigma range, the data shape and, for
    class-conditional models, the number of classes.
    """

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    image_shape: tuple[int, ...] | None = None
    num_classes: int | None = None
    #: discrete-time models expose their sigma table (ascending, one per training timestep)
    discrete_sigmas: Tensor | None = None

    def forward(self, x: Tensor, sigma: Tensor | float, **cond: Any) -> Tensor:
        self.check_shape(x)
        return self.denoise(x, expand_sigma(sigma, x), **cond)

    def denoise(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        raise NotImplementedError

    def check_shape(self, x: Tensor) -> None:
        """Fail with a clear message when ``x`` does not have the model's data shape."""
        if self.image_shape is not None and tuple(x.shape[1:]) != tuple(self.image_shape):
            fail(
                f"input shape {tuple(x.shape[1:])} does not match the model's data shape "
                f"{tuple(self.image_shape)} (check dataset / model.image_size / channels)"
            )

    def identity(self) -> dict[str, Any]:
        """A description that identifies this model (saved beside learned samplers / schedules)."""
        return {"class": type(self).__name__, "image_shape": self.image_shape}


class EDMDenoiser(Denoiser):
    """EDM preconditioning ``D = c_skip x + c_out F(c_in x, c_noise)`` around a raw network ``F``.

    ``F(x, noise_labels, class_labels=None)`` is e.g. :class:`fastsample.models.unet.UNet`.
    """

    def __init__(
        self,
        net: nn.Module,
        sigma_data: float = 0.5,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        image_shape: tuple[int, ...] | None = None,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.sigma_data = sigma_data
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.image_shape = tuple(image_shape) if image_shape is not None else None
        self.num_classes = num_classes

    def denoise(self, x: Tensor, sigma: Tensor, class_labels: Tensor | None = None, **_: Any) -> Tensor:
        sd2 = self.sigma_data**2
        s = append_dims(sigma, x.ndim)
        c_skip = sd2 / (s**2 + sd2)
        c_out = s * self.sigma_data / (s**2 + sd2).sqrt()
        c_in = 1 / (s**2 + sd2).sqrt()
        c_noise = sigma.log() / 4
        raw = self.net(c_in * x, c_noise, class_labels)
        return c_skip * x + c_out * raw.to(x.dtype)


class FunctionDenoiser(Denoiser):
    """Adapts any callable ``model(x, sigma, **cond) -> x0`` (k-diffusion style) to :class:`Denoiser`."""

    def __init__(
        self,
        fn: Callable[..., Tensor],
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        image_shape: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        self.fn = fn
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.image_shape = tuple(image_shape) if image_shape is not None else None

    def denoise(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        return self.fn(x, sigma, **cond)


class CountingDenoiser(Denoiser):
    """Wraps a denoiser and counts its calls (network function evaluations, NFE)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0
        for name in ("sigma_min", "sigma_max", "sigma_data", "image_shape", "num_classes", "discrete_sigmas"):
            if hasattr(inner, name):
                object.__setattr__(self, name, getattr(inner, name))

    def forward(self, x: Tensor, sigma: Tensor | float, **cond: Any) -> Tensor:
        self.calls += 1
        return self.inner(x, sigma, **cond)


def vp_sigma(abar: Tensor | float) -> Tensor | float:
    """sigma of a VP state with cumulative alpha ``abar``: ``sqrt((1 - abar) / abar)``."""
    if isinstance(abar, Tensor):
        return ((1 - abar) / abar).sqrt()
    return math.sqrt((1 - abar) / abar)


#: the attributes schedules and entry points read from a denoiser; wrappers pass them through
DENOISER_ATTRIBUTES = (
    "sigma_min",
    "sigma_max",
    "sigma_data",
    "image_shape",
    "num_classes",
    "discrete_sigmas",
)


class WrappedDenoiser(Denoiser):
    """Base of denoiser wrappers: copies the wrapped model's range, shape and class count."""

    def __init__(self, inner: Any) -> None:
        super().__init__()
        self.inner = inner
        for name in DENOISER_ATTRIBUTES:
            if hasattr(inner, name):
                object.__setattr__(self, name, getattr(inner, name))

    def identity(self) -> dict[str, Any]:
        inner = self.inner.identity() if hasattr(self.inner, "identity") else type(self.inner).__name__
        return {"class": type(self).__name__, "inner": inner}
