"""Deterministic probability-flow ODE solvers in sigma space.

All share the signature ``sample_<name>(denoiser, x, sigmas, *, cond, guidance, generator, callback,
**knobs) -> x`` with ``sigmas`` descending; the state starts at ``sigmas[0]`` (any level, not only
sigma_max) and, when the grid ends at 0, the last step returns the denoised estimate exactly.
The functions never disable autograd, so they can be differentiated through (DDSS, schedule
optimization); entry points wrap them in ``torch.no_grad``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from fastsample.samplers.common import Callback, GuidanceFn, bind, report
from fastsample.samplers.registry import register
from fastsample.utils.errors import check_choice, check_range
from fastsample.utils.seeding import randn_like


@register("euler", order=1)
def sample_euler(
    denoiser: Any,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: dict | None = None,
    guidance: GuidanceFn | None = None,
    generator: Any = None,
    callback: Callback | None = None,
) -> Tensor:
    """Euler steps of ``dx/dsigma = (x - D) / sigma``: exactly deterministic DDIM. NFE = steps.

    The step to sigma = 0 returns ``D`` itself: ``x - sigma (x - D) / sigma`` equals it only up to
    rounding (about half of the entries differ by an ulp).
    """
    model = bind(denoiser, cond, guidance)
    levels = sigmas.tolist()
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        x = denoised if levels[i + 1] == 0 else x + (sigmas[i + 1] - sigmas[i]) * (x - denoised) / sigmas[i]
        report(callback, i, sigmas, x, denoised)
    return x


def heun_nfe(steps: int) -> int:
    return 2 * steps - 1


def churn_gamma(sigma: float, steps: int, s_churn: float, s_min: float, s_max: float) -> float:
    """EDM's noise increase factor for one step: only inside [s_min, s_max], at most sqrt(2) - 1."""
    return min(s_churn / steps, math.sqrt(2) - 1) if s_min <= sigma <= s_max else 0.0


@register("heun", nfe=heun_nfe, order=2)
@register("edm_sde", nfe=heun_nfe, stochastic=True, s_churn=40.0, s_min=0.05, s_max=50.0, s_noise=1.003)
def sample_heun(
    denoiser: Any,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: dict | None = None,
    guidance: GuidanceFn | None = None,
    generator: Any = None,
    callback: Callback | None = None,
    s_churn: float = 0.0,
    s_min: float = 0.0,
    s_max: float = float("inf"),
    s_noise: float = 1.0,
) -> Tensor:
    """EDM's Heun sampler (Algorithm 2); with ``s_churn > 0`` the stochastic variant.

    Each step first raises the noise to ``sigma_hat = sigma (1 + gamma)`` (churn), then takes a
    Heun step to the next sigma; the step to sigma = 0 is Euler. NFE = 2 steps - 1.
    """
    check_range("sampler.s_churn", s_churn, low=0)
    model = bind(denoiser, cond, guidance)
    steps, levels = len(sigmas) - 1, sigmas.tolist()
    for i in range(steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        gamma = churn_gamma(levels[i], steps, s_churn, s_min, s_max)
        if gamma > 0:
            sigma = sigma * (1 + gamma)
            x = x + randn_like(x, generator) * s_noise * (sigma**2 - sigmas[i] ** 2).sqrt()
        denoised = model(x, sigma)
        if levels[i + 1] == 0:  # the Euler step to 0, exactly: x - sigma (x - D) / sigma = D
            x = denoised
            report(callback, i, sigmas, x, denoised)
            continue
        slope = (x - denoised) / sigma
        x_next = x + (sigma_next - sigma) * slope
        slope_next = (x_next - model(x_next, sigma_next)) / sigma_next
        x = x + (sigma_next - sigma) * (slope + slope_next) / 2
        report(callback, i, sigmas, x, denoised)
    return x


#: diffusers lowers the order of the last steps (``lower_order_final``) only on grids shorter than this
LOWER_ORDER_FINAL_BELOW = 15
#: second-order DPM-Solver++ variants: k-diffusion's / diffusers' default, and diffusers' "heun"
SOLVER_TYPES = ("midpoint", "heun")


def final_order_cap(i: int, steps: int, order: int, lower_order_final: bool, euler_at_final: bool) -> int:
    """The order step ``i`` of ``steps`` may use, by diffusers' rule (DPM-Solver / DEIS multistep).

    ``lower_order_final`` (below :data:`LOWER_ORDER_FINAL_BELOW` steps): first order on the last step
    and at most second order on the one before, where long extrapolations from few large steps are
    unstable; ``euler_at_final``: first order on the last step at any step count. A step to sigma = 0
    returns the denoised estimate in every solver here, so these matter on grids ending above 0.
    """
    short = lower_order_final and steps < LOWER_ORDER_FINAL_BELOW
    if i == steps - 1 and (euler_at_final or short):
        return 1
    if i == steps - 2 and short:
        return min(order, 2)
    return order


def dpmpp_step(
    x: Tensor,
    sigma: Tensor,
    sigma_next: Tensor,
    denoised: Tensor,
    previous: tuple[Tensor, Tensor] | None,
    solver_type: str = "midpoint",
) -> Tensor:
    """One DPM-Solver++ step in ``lambda = -log sigma``: first order, or second order with ``previous``.

    ``previous`` is (denoised, sigma) of the step before. 'midpoint' extrapolates the data prediction
    to the step's midpoint (k-diffusion, diffusers' default); 'heun' weights the difference by
    ``phi_2 = expm1(-h) / h + 1`` (diffusers' ``solver_type="heun"``). Both are second order.
    """
    h = sigma.log() - sigma_next.log()
    estimate = denoised
    if previous is not None and solver_type == "midpoint":
        half_inverse_ratio = 0.5 * h / (previous[1].log() - sigma.log())
        estimate = (1 + half_inverse_ratio) * denoised - half_inverse_ratio * previous[0]
    x = (sigma_next / sigma) * x - torch.expm1(-h) * estimate
    if previous is not None and solver_type == "heun":
        ratio = h / (previous[1].log() - sigma.log())
        x = x + (torch.expm1(-h) / h + 1) * (denoised - previous[0]) * ratio
    return x


@register("dpmpp_2m", order=2)
def sample_dpmpp_2m(
    denoiser: Any,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: dict | None = None,
    guidance: GuidanceFn | None = None,
    generator: Any = None,
    callback: Callback | None = None,
    lower_order_final: bool = False,
    euler_at_final: bool = False,
    solver_type: str = "midpoint",
) -> Tensor:
    """DPM-Solver++(2M): second-order multistep in ``lambda = -log sigma`` on data predictions.

    ``lower_order_final`` / ``euler_at_final``: diffusers' few-step rules (:func:`final_order_cap`);
    ``solver_type``: the second-order variant (:func:`dpmpp_step`). The defaults are k-diffusion's.
    """
    check_choice("sampler.solver_type", solver_type, SOLVER_TYPES)
    model = bind(denoiser, cond, guidance)
    levels, steps = sigmas.tolist(), len(sigmas) - 1
    previous: tuple[Tensor, Tensor] | None = None
    for i in range(steps):
        denoised = model(x, sigmas[i])
        if levels[i + 1] == 0:
            x = denoised
        else:
            second = previous if final_order_cap(i, steps, 2, lower_order_final, euler_at_final) > 1 else None
            x = dpmpp_step(x, sigmas[i], sigmas[i + 1], denoised, second, solver_type)
        previous = (denoised, sigmas[i])
        report(callback, i, sigmas, x, denoised)
    return x


def dpmpp_3m_correct(
    x: Tensor,
    denoised: Tensor,
    history: list[tuple[Tensor, Tensor]],
    h: Tensor,
    order: int,
    solver_type: str,
    anchor_compatible: bool,
) -> Tensor:
    """DPM-Solver++(3M)'s higher-order terms (up to ``order``) added to ``x``, its first-order step.

    ``history`` holds (denoised, h) of the previous steps, newest first. The second-difference term is
    ``-phi_3 * h^2 x0''``; DPM-Solver's reference code, diffusers and k-diffusion use
    ``d2 = h^2 x0'' / 2`` with the same ``phi_3``, which makes the local error O(h^3) (measured global
    order ~2). We use ``2 * d2`` (exact for quadratic ``x0(lambda)``, measured order 3);
    ``anchor_compatible=True`` reproduces the anchors' update for cross-checks.
    """
    phi_2 = torch.expm1(-h) / h + 1
    if order >= 3:
        (denoised_1, h_1), (denoised_2, h_2) = history[:2]
        r0, r1 = h_1 / h, h_2 / h
        d1_0 = (denoised - denoised_1) / r0
        d1_1 = (denoised_1 - denoised_2) / r1
        d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        return x + phi_2 * d1 - (phi_2 / h - 0.5) * (1 if anchor_compatible else 2) * d2
    denoised_1, h_1 = history[0]
    if solver_type == "midpoint":  # diffusers' default second-order update of its 3M
        return x - 0.5 * torch.expm1(-h) * (denoised - denoised_1) * h / h_1
    return x + phi_2 * (denoised - denoised_1) * h / h_1


@register("dpmpp_3m", order=3)
def sample_dpmpp_3m(
    denoiser: Any,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: dict | None = None,
    guidance: GuidanceFn | None = None,
    generator: Any = None,
    callback: Callback | None = None,
    anchor_compatible: bool = False,
    lower_order_final: bool = False,
    euler_at_final: bool = False,
    solver_type: str = "heun",
) -> Tensor:
    """DPM-Solver++(3M): third-order multistep (first and second order while warming up).

    See :func:`dpmpp_3m_correct` for the third-order coefficient (``anchor_compatible``);
    ``lower_order_final`` / ``euler_at_final``: diffusers' few-step rules (:func:`final_order_cap`);
    ``solver_type``: the second-order update of the warm-up and lowered steps ('heun' as k-diffusion,
    'midpoint' as diffusers' default).
    """
    check_choice("sampler.solver_type", solver_type, SOLVER_TYPES)
    model = bind(denoiser, cond, guidance)
    levels, steps = sigmas.tolist(), len(sigmas) - 1
    history: list[tuple[Tensor, Tensor]] = []  # (denoised, h) of the previous steps, newest first
    for i in range(steps):
        denoised = model(x, sigmas[i])
        if levels[i + 1] == 0:
            x = denoised
            report(callback, i, sigmas, x, denoised)
            continue
        h = sigmas[i].log() - sigmas[i + 1].log()
        x = (sigmas[i + 1] / sigmas[i]) * x - torch.expm1(-h) * denoised
        order = final_order_cap(i, steps, len(history) + 1, lower_order_final, euler_at_final)
        if order > 1:
            x = dpmpp_3m_correct(x, denoised, history, h, min(order, 3), solver_type, anchor_compatible)
        history.insert(0, (denoised, h))
        del history[2:]
        report(callback, i, sigmas, x, denoised)
    return x


def _lagrange_weights(nodes: Tensor, start: Tensor, end: Tensor) -> Tensor:
    """Integrals over [start, end] of the Lagrange basis polynomials on ``nodes`` (differentiable).

    Substituting ``u = (s - start) / (end - start)`` maps the interval to [0, 1], where the
    integral of ``u^p`` is ``1 / (p + 1)``.
    """
    width = end - start
    u_nodes = (nodes - start) / width
    weights = []
    for j in range(len(nodes)):
        poly = lagrange_basis(u_nodes, j)
        powers = torch.arange(1, len(poly) + 1, dtype=nodes.dtype, device=nodes.device)
        weights.append(width * (poly / powers).sum())
    return torch.stack(weights)


def lagrange_basis(nodes: Tensor, j: int) -> Tensor:
    """Coefficients (lowest first) of the Lagrange basis polynomial ``L_j`` on ``nodes`` (differentiable)."""
    poly = torch.ones(1, dtype=nodes.dtype, device=nodes.device)
    for m in range(len(nodes)):
        if m != j:
            shifted = torch.cat([-nodes[m : m + 1] * poly, poly.new_zeros(1)])
            shifted[1:] = shifted[1:] + poly
            poly = shifted / (nodes[j] - nodes[m])
    return poly


@register("lms", order=4)
def sample_lms(
    denoiser: Any,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: dict | None = None,
    guidance: GuidanceFn | None = None,
    generator: Any = None,
    callback: Callback | None = None,
    order: int = 4,
) -> Tensor:
    """Variable-step Adams-Bashforth (linear multistep) on ``dx/dsigma``, orders 1-4 with warm-up.

    The slope is extrapolated by the Lagrange polynomial through the last ``order`` slopes at their
    true sigmas and integrated exactly over the step, so the order holds on any grid (this is
    k-diffusion's ``lms`` and, in sigma space, DEIS' rho-AB).
    """
    check_range("sampler.order", order, low=1, high=4)
    model = bind(denoiser, cond, guidance)
    slopes: list[Tensor] = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        slopes = [(x - denoised) / sigmas[i]] + slopes[: order - 1]
        nodes = torch.stack([sigmas[i - k] for k in range(len(slopes))])
        weights = _lagrange_weights(nodes, sigmas[i], sigmas[i + 1])
        x = x + sum(weight * slope for weight, slope in zip(weights, slopes))
        report(callback, i, sigmas, x, denoised)
    return x


#: Adams-Bashforth coefficients for equal steps, newest slope first
ADAMS_BASHFORTH = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


@register("plms", order=4)
@register("ipndm", order=4)
def sample_plms(
    denoiser: Any,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: dict | None = None,
    guidance: GuidanceFn | None = None,
    generator: Any = None,
    callback: Callback | None = None,
    order: int = 4,
) -> Tensor:
    """PLMS / iPNDM: fixed-coefficient Adams-Bashforth on the slope (eps) with lower-order warm-up.

    The coefficients assume equal steps, as in PNDM and iPNDM; on strongly non-uniform grids
    prefer :func:`sample_lms`, which keeps its order there.
    """
    check_range("sampler.order", order, low=1, high=4)
    model = bind(denoiser, cond, guidance)
    slopes: list[Tensor] = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        slopes = [(x - denoised) / sigmas[i]] + slopes[: order - 1]
        coefficients = ADAMS_BASHFORTH[len(slopes)]
        x = x + (sigmas[i + 1] - sigmas[i]) * sum(c * s for c, s in zip(coefficients, slopes))
        report(callback, i, sigmas, x, denoised)
    return x
