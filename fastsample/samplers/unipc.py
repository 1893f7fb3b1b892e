"""UniPC (Zhao et al., 2023): unified predictor-corrector multistep solver, data prediction, B(h)=expm1.

In sigma space (``alpha = 1``, ``lambda = -log sigma``) a step from s to t with ``h = lambda_t - lambda_s``
is ``x_t = (sigma_t / sigma_s) x_s - expm1(-h) x0_s - expm1(-h) sum_k rho_k D_k`` where ``D_k`` are
divided differences of earlier data predictions. The predictor (UniP-p) uses earlier
predictions only; the corrector (UniC) re-does the step once the model has been called at ``t``,
which that call is needed for anyway, so the corrector is free: NFE = steps, order p + 1.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from fastsample.samplers.common import Callback, GuidanceFn, bind, report
from fastsample.samplers.registry import register
from fastsample.utils.errors import check_range


def _coefficient_system(h: Tensor, ratios: list[Tensor], order: int) -> tuple[Tensor, Tensor]:
    """The matrix R (powers of the step ratios) and vector b of UniPC's order conditions (bh2)."""
    hh = -h
    b_h = torch.expm1(hh)
    h_phi_k = torch.expm1(hh) / hh - 1
    ratios = [*ratios, torch.ones_like(h)]
    rows, rhs = [], []
    for k in range(1, order + 1):
        rows.append(torch.stack([r ** (k - 1) for r in ratios]))
        rhs.append(h_phi_k * math.factorial(k) / b_h)
        h_phi_k = h_phi_k / hh - 1 / math.factorial(k + 1)
    return torch.stack(rows), torch.stack(rhs)


def _divided_differences(
    sigma_s: Tensor, h: Tensor, x0_s: Tensor, older: list[tuple[Tensor, Tensor]]
) -> tuple[list[Tensor], list[Tensor]]:
    """Step ratios ``r_k`` of earlier points and differences ``(x0_k - x0_s) / r_k``."""
    ratios, diffs = [], []
    for x0_k, sigma_k in older:
        ratio = (sigma_s.log() - sigma_k.log()) / h  # (lambda_k - lambda_s) / h, negative
        ratios.append(ratio)
        diffs.append((x0_k - x0_s) / ratio)
    return ratios, diffs


def unipc_step(
    x: Tensor,
    sigma_s: Tensor,
    sigma_t: Tensor,
    history: list[tuple[Tensor, Tensor]],
    order: int,
    x0_t: Tensor | None = None,
) -> Tensor:
    """One UniP step (``x0_t`` None) or UniC correction (``x0_t`` given) from sigma_s to sigma_t.

    ``history`` holds (x0, sigma) pairs, newest first, starting with the prediction at sigma_s.
    """
    h = sigma_s.log() - sigma_t.log()
    x0_s = history[0][0]
    ratios, diffs = _divided_differences(sigma_s, h, x0_s, history[1:order])
    system, rhs = _coefficient_system(h, ratios, order)
    base = (sigma_t / sigma_s) * x - torch.expm1(-h) * x0_s
    b_h = torch.expm1(-h)
    if x0_t is None:
        if not diffs:
            return base
        rhos = rhs.new_tensor([0.5]) if order == 2 else torch.linalg.solve(system[:-1, :-1], rhs[:-1])
        return base - b_h * sum(rho * d for rho, d in zip(rhos, diffs))
    rhos = rhs.new_tensor([0.5]) if order == 1 else torch.linalg.solve(system, rhs)
    correction = sum((rho * d for rho, d in zip(rhos[:-1], diffs)), torch.zeros_like(x))
    return base - b_h * (correction + rhos[-1] * (x0_t - x0_s))


@register("unipc", order=3)
def sample_unipc(
    denoiser: Any,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: dict | None = None,
    guidance: GuidanceFn | None = None,
    generator: Any = None,
    callback: Callback | None = None,
    order: int = 2,
    corrector: bool = True,
    lower_order_final: bool = True,
) -> Tensor:
    """UniPC multistep sampler (bh2, data prediction): predictor order ``order`` with UniC."""
    check_range("sampler.order", order, low=1, high=3)
    model = bind(denoiser, cond, guidance)
    levels, steps = sigmas.tolist(), len(sigmas) - 1
    history: list[tuple[Tensor, Tensor]] = []
    previous_x, previous_order = x, 1
    for i in range(steps):
        denoised = model(x, sigmas[i])
        if corrector and history:
            x = unipc_step(previous_x, sigmas[i - 1], sigmas[i], history, previous_order, x0_t=denoised)
        history = [(denoised, sigmas[i]), *history][:order]
        if levels[i + 1] == 0:
            x = denoised
        else:
            step_order = min(order, len(history), steps - i if lower_order_final else order)
            previous_x, previous_order = x, step_order
            x = unipc_step(x, sigmas[i], sigmas[i + 1], history, step_order)
        report(callback, i, sigmas, x, denoised)
    return x
