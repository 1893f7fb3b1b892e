"""DEIS (Zhang & Chen, 2023): exponential-integrator multistep on eps, polynomial in log sigma.

This is diffusers' ``DEISMultistepScheduler`` (``algorithm_type="deis"``, ``solver_type="logrho"``)
written in sigma space. With ``alpha = 1`` the probability-flow ODE is ``dx/dsigma = eps(x, sigma)``
where ``eps = (x - D) / sigma``; DEIS interpolates the last ``order`` eps values by a polynomial in
``log sigma`` (DEIS' ``rho`` is our sigma) and integrates it exactly over the step:

    x_t = x_s + sum_k w_k eps_k,    w_k = integral from sigma_s to sigma_t of L_k(log sigma) d sigma

with ``L_k`` the Lagrange basis on the nodes' ``log sigma``. diffusers evaluates these integrals in
closed form for orders 2 and 3; :func:`log_lagrange_weights` does it for any order. Order 1 is DDIM
(Euler in sigma). One model call per step; the step to sigma = 0 returns the denoised estimate.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fastsample.samplers.common import Callback, GuidanceFn, bind, report
from fastsample.samplers.ode import final_order_cap, lagrange_basis
from fastsample.samplers.registry import register
from fastsample.utils.errors import check_range


def _exp_antiderivative(poly: Tensor, v: Tensor) -> Tensor:
    """``e^v * sum_i (-1)^i p^(i)(v)``: an antiderivative of ``p(v) e^v`` (``poly``: p's coefficients).

    Horner evaluation (no ``v ** 0``), so the gradient stays finite at ``v = 0``.
    """
    total, term, sign = v.new_zeros(()), poly, 1.0
    while len(term):
        value = v.new_zeros(())
        for coefficient in term.flip(0):
            value = value * v + coefficient
        total = total + sign * value
        term = term[1:] * torch.arange(1, len(term), dtype=v.dtype, device=v.device)  # p -> p'
        sign = -sign
    return v.exp() * total


def log_lagrange_weights(nodes: Tensor, start: Tensor, end: Tensor) -> Tensor:
    """``w_k``: integrals over sigma in [start, end] of the Lagrange basis on ``log(nodes)`` (differentiable).

    Substituting ``sigma = start * e^v`` (``v = log(sigma / start)``) makes each integral
    ``start * integral of L_k(v) e^v dv`` from 0 to ``log(end / start)``, which
    :func:`_exp_antiderivative` gives exactly; centring at ``start`` keeps the cancellation small.
    """
    v_nodes = nodes.log() - start.log()
    v_end = end.log() - start.log()
    zero = torch.zeros_like(v_end)
    weights = []
    for j in range(len(nodes)):
        poly = lagrange_basis(v_nodes, j)
        weights.append(start * (_exp_antiderivative(poly, v_end) - _exp_antiderivative(poly, zero)))
    return torch.stack(weights)


@register("deis", order=3)
def sample_deis(
    denoiser: Any,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: dict | None = None,
    guidance: GuidanceFn | None = None,
    generator: Any = None,
    callback: Callback | None = None,
    order: int = 3,
    lower_order_final: bool = True,
    euler_at_final: bool = False,
) -> Tensor:
    """DEIS multistep (log-rho AB) of order 1-3 with lower-order warm-up. NFE = steps.

    ``lower_order_final`` (diffusers' default, True) / ``euler_at_final``: diffusers' few-step rules
    (:func:`~fastsample.samplers.ode.final_order_cap`). diffusers' DEIS ends its time-uniform grids at
    sigma_min (schedule ``final_sigmas_type: sigma_min``); here any grid works, including one ending at 0.
    """
    check_range("sampler.order", order, low=1, high=3)
    model = bind(denoiser, cond, guidance)
    levels, steps = sigmas.tolist(), len(sigmas) - 1
    slopes: list[Tensor] = []  # eps of the previous steps, newest first
    for i in range(steps):
        denoised = model(x, sigmas[i])
        slopes = [(x - denoised) / sigmas[i], *slopes][:order]
        if levels[i + 1] == 0:  # the first-order step to 0, exactly: x - sigma eps = D
            x = denoised
        else:
            used = final_order_cap(i, steps, len(slopes), lower_order_final, euler_at_final)
            nodes = torch.stack([sigmas[i - k] for k in range(used)])
            weights = log_lagrange_weights(nodes, sigmas[i], sigmas[i + 1])
            x = x + sum(weight * slope for weight, slope in zip(weights, slopes[:used]))
        report(callback, i, sigmas, x, denoised)
    return x
