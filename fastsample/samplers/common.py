"""What every sampler shares: binding condition and guidance to the denoiser, and guarding numerics."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from fastsample.utils.errors import NumericalError

#: g(x, sigma, denoised) -> a term added to dx/dsigma (classifier guidance, data consistency, ...)
GuidanceFn = Callable[[Tensor, Tensor, Tensor], Tensor]
Callback = Callable[[dict[str, Any]], None]


class BoundModel:
    """``f(x, sigma) -> x0``: a denoiser with its condition and guidance bound, checked for finiteness.

    Guidance adds ``g`` to the ODE field ``(x - D) / sigma``; this is the same as denoising to
    ``D - sigma * g``, so every plain sampler integrates the summed field unchanged.
    """

    def __init__(
        self,
        denoiser: Callable[..., Tensor],
        cond: dict[str, Any] | None = None,
        guidance: GuidanceFn | None = None,
        check_finite: bool = True,
    ) -> None:
        self.denoiser = denoiser
        self.cond = cond or {}
        self.guidance = guidance
        self.check_finite = check_finite
        self.calls = 0

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        self.calls += 1
        denoised = self.denoiser(x, sigma * x.new_ones(x.shape[0]), **self.cond)
        if self.guidance is not None:
            denoised = denoised - sigma * self.guidance(x, sigma, denoised)
        if self.check_finite and not bool(torch.isfinite(denoised).all()):
            raise NumericalError(
                f"the model returned non-finite values at call {self.calls} (sigma={float(sigma):.4g}); "
                "check the checkpoint, the input range and model precision"
            )
        return denoised


def bind(
    denoiser: Callable[..., Tensor], cond: dict[str, Any] | None, guidance: GuidanceFn | None
) -> BoundModel:
    """Bind ``cond`` and ``guidance`` to ``denoiser`` (a no-op if it is already bound)."""
    if isinstance(denoiser, BoundModel) and cond is None and guidance is None:
        return denoiser
    return BoundModel(denoiser, cond, guidance)


def report(callback: Callback | None, i: int, sigmas: Tensor, x: Tensor, denoised: Tensor) -> None:
    """Tell ``callback`` that step ``i`` (sigmas[i] -> sigmas[i + 1]) finished with state ``x``."""
    if callback is not None:
        callback({"i": i, "sigma": sigmas[i], "sigma_next": sigmas[i + 1], "x": x, "denoised": denoised})
