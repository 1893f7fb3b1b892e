"""What every sampler shares: binding condition and guidance to the denoiser, and guarding numerics.

Two guards raise :class:`NumericalError` (exit code 3): :class:`BoundModel` checks every model output
(naming the call and sigma) and :func:`guard_states` every state a sampler reports after a step (naming
the step and its sigmas), which catches what the model check cannot: overflow in the solver's own
arithmetic (multistep extrapolation, huge guidance terms, low-precision states).
"""

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
            cause = "the model with its guidance term" if self.guidance is not None else "the model"
            hint = "lower guidance.scale; " if self.guidance is not None else ""
            raise NumericalError(
                f"{cause} returned non-finite values at call {self.calls} (sigma={float(sigma):.4g}); "
                f"{hint}check the checkpoint, the input range and model precision"
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


def guard_states(callback: Callback | None) -> Callback:
    """A step callback that raises :class:`NumericalError` on a non-finite state, then calls ``callback``.

    Every sampler reports its state after each step (:func:`report`), so wrapping the callback checks
    all of them at the cost of one reduction per step.
    """

    def check(info: dict[str, Any]) -> None:
        if not bool(torch.isfinite(info["x"]).all()):
            raise NumericalError(
                f"the sampler state became non-finite at step {info['i']} (sigma {float(info['sigma']):.4g} "
                f"-> {float(info['sigma_next']):.4g}); use more steps, precision=float64 or a lower "
                "guidance.scale"
            )
        if callback is not None:
            callback(info)

    return check
