"""Operator-splitting samplers for guided sampling (Wizadwongsa & Suwajanakorn, ICLR 2023).

The guided probability-flow ODE ``dx/dsigma = f(x, sigma) + g(x, sigma)`` has a diffusion part
``f = (x - D(x, sigma)) / sigma`` and a conditional part ``g`` (classifier guidance, data
consistency; see :mod:`fastsample.guidance`). A high-order multistep solver on the summed field
breaks down when ``g`` is large: the small stability region of Adams-Bashforth meets a stiff field.
Splitting integrates the parts apart: the diffusion part with a multistep solver of the registry on
the *unguided* model (one model call per step), the conditional part with Euler steps (optionally
heavy-ball momentum).

* ``ltsp`` (Lie-Trotter): per step, one Euler step of ``g`` over the whole step, then one base step
  of ``f`` from the new state (``cond_first=False``: the reverse order). First order.
* ``stsp`` (Strang): half a step of ``g``, a full base step of ``f``, half a step of ``g``. Two
  details make it second order with a *multistep* base (measured in tests/test_splitting.py):

  - the closing half step is implicit Euler at ``sigmas[i + 1]`` (the adjoint of the explicit
    opening half step, which makes the step symmetric), done by one predictor-corrector pass whose
    second evaluation of ``g`` is also the next step's opening slope: 2 evaluations per step;
  - the model is evaluated at the step's starting state (on the guided trajectory, where the
    multistep history lives) and the opening half step is carried through the base's linear part.
    Evaluated after the opening half step instead (the literal ``G o F o G`` of the authors'
    code, ``model_at="opened"``), the Adams-Bashforth history, which follows the guided trajectory,
    extrapolates the slope along ``f + g`` where the sub-flow of ``f`` alone is wanted: an O(h^2)
    local error, first order overall. So is an explicit closing step (``corrector=False``).

Without guidance (no ``g``) splitting has nothing to split and refuses to run. With a conditional
function of scale 0 (``g = 0``), both samplers return exactly what their base sampler returns.

Costs: NFE = steps (base model calls). Evaluations of ``g`` (each one backward pass; see
:func:`grad_evals`): ``ltsp`` steps, ``stsp`` 2 steps (+1 when the grid ends above 0). The callback
receives the running counts as ``info["nfe"]`` and ``info["grad_evals"]``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fastsample.samplers.common import Callback, GuidanceFn, bind
from fastsample.samplers.ode import ADAMS_BASHFORTH, _lagrange_weights
from fastsample.samplers.registry import register
from fastsample.utils.errors import check_choice, check_range, fail

#: multistep samplers of the registry the diffusion part can use, with their default order
BASES = {"plms": 4, "ipndm": 4, "lms": 4, "dpmpp_2m": 2, "euler": 1}
SPLITTING = ("ltsp", "stsp")
MODEL_AT = ("grid", "opened")


class _BaseStepper:
    """One multistep solver for the diffusion part, advanced one step at a time.

    The arithmetic is that of the registry function of the same name, operation for operation, so a
    split run with ``g = 0`` reproduces the base sampler bit for bit.
    """

    def __init__(self, order: int) -> None:
        self.order = order
        self.slopes: list[Tensor] = []
        self.previous: Tensor | None = None

    def step(self, x: Tensor, i: int, sigmas: Tensor, levels: list[float], denoised: Tensor) -> Tensor:
        raise NotImplementedError

    def carry(self, displacement: Tensor, i: int, sigmas: Tensor) -> Tensor:
        """How a displacement of the state at ``sigmas[i]`` shows at ``sigmas[i + 1]`` (linear part)."""
        return displacement


class _AdamsBashforth(_BaseStepper):
    """``plms`` / ``ipndm``: fixed equal-step Adams-Bashforth coefficients on the slope."""

    def step(self, x: Tensor, i: int, sigmas: Tensor, levels: list[float], denoised: Tensor) -> Tensor:
        self.slopes = [(x - denoised) / sigmas[i]] + self.slopes[: self.order - 1]
        coefficients = ADAMS_BASHFORTH[len(self.slopes)]
        return x + (sigmas[i + 1] - sigmas[i]) * sum(c * s for c, s in zip(coefficients, self.slopes))


class _LagrangeMultistep(_BaseStepper):
    """``lms``: Adams-Bashforth through the previous slopes at their true sigmas."""

    def step(self, x: Tensor, i: int, sigmas: Tensor, levels: list[float], denoised: Tensor) -> Tensor:
        self.slopes = [(x - denoised) / sigmas[i]] + self.slopes[: self.order - 1]
        nodes = torch.stack([sigmas[i - k] for k in range(len(self.slopes))])
        weights = _lagrange_weights(nodes, sigmas[i], sigmas[i + 1])
        return x + sum(weight * slope for weight, slope in zip(weights, self.slopes))


class _DPMSolver2M(_BaseStepper):
    """``dpmpp_2m``: DPM-Solver++(2M) on data predictions (order 1: the DDIM / exponential Euler step)."""

    def step(self, x: Tensor, i: int, sigmas: Tensor, levels: list[float], denoised: Tensor) -> Tensor:
        if levels[i + 1] == 0:
            x = denoised
        else:
            h = sigmas[i].log() - sigmas[i + 1].log()
            estimate = denoised
            if self.previous is not None and self.order >= 2:
                half_inverse_ratio = 0.5 * h / (sigmas[i - 1].log() - sigmas[i].log())
                estimate = (1 + half_inverse_ratio) * denoised - half_inverse_ratio * self.previous
            x = (sigmas[i + 1] / sigmas[i]) * x - torch.expm1(-h) * estimate
        self.previous = denoised
        return x

    def carry(self, displacement: Tensor, i: int, sigmas: Tensor) -> Tensor:
        return (sigmas[i + 1] / sigmas[i]) * displacement


class _Euler(_BaseStepper):
    """``euler`` (deterministic DDIM)."""

    def step(self, x: Tensor, i: int, sigmas: Tensor, levels: list[float], denoised: Tensor) -> Tensor:
        return x + (sigmas[i + 1] - sigmas[i]) * (x - denoised) / sigmas[i]


_STEPPERS = {
    "plms": _AdamsBashforth,
    "ipndm": _AdamsBashforth,
    "lms": _LagrangeMultistep,
    "dpmpp_2m": _DPMSolver2M,
    "euler": _Euler,
}
_ORDER_RANGE = {"plms": (1, 4), "ipndm": (1, 4), "lms": (1, 4), "dpmpp_2m": (1, 2), "euler": (1, 1)}


def make_base(base: str, order: int | None) -> _BaseStepper:
    """The stepper of ``base`` with ``order`` (``None``: the base's default, see :data:`BASES`)."""
    check_choice("sampler.base", base, BASES)
    order = BASES[base] if order is None else order
    low, high = _ORDER_RANGE[base]
    if not isinstance(order, int) or not low <= order <= high:
        allowed = f"{low}" if low == high else f"{low}-{high}"
        fail(f"sampler.order={order!r} is not allowed with sampler.base={base}; allowed: {allowed} or null")
    return _STEPPERS[base](order)


def check_conditional(name: str, guidance: GuidanceFn | None) -> GuidanceFn:
    """Splitting needs a conditional function; fail naming the sensible alternatives."""
    if guidance is None:
        fail(
            f"sampler={name} splits the guided ODE into the diffusion part and a conditional function g, "
            "but there is none: use it with guidance=classifier, gmm_posterior, inpaint, colorize or "
            "superres (guidance=none and guidance=cfg, a denoiser wrapper, need a plain sampler such as plms)"
        )
    if getattr(guidance, "needs_denoised", False):
        fail(f"sampler={name}: this conditional function needs the denoised estimate, which splitting lacks")
    return guidance


def grad_evals(name: str, steps: int, ends_at_zero: bool = True, corrector: bool = True) -> int:
    """Evaluations of the conditional function for ``steps`` steps (see the module docstring)."""
    check_choice("sampler.name", name, SPLITTING)
    if name == "ltsp":
        return steps
    if not corrector:
        return 2 * steps
    return 2 * steps if ends_at_zero else 2 * steps + 1


class _Conditional:
    """The conditional part: counted evaluations of ``g`` and Euler / heavy-ball sub-steps."""

    def __init__(self, guidance: GuidanceFn, beta: float) -> None:
        self.guidance, self.beta = guidance, beta
        self.evals = 0
        self.velocity: Tensor | None = None

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        self.evals += 1
        return self.guidance(x, sigma, None)

    def advance(self, x: Tensor, dt: Tensor, slope: Tensor) -> Tensor:
        """``x + dt * v`` with heavy-ball ``v = (1 - beta) v + beta * slope`` (beta = 1: Euler)."""
        return x + self.increment(dt, slope)

    def increment(self, dt: Tensor, slope: Tensor) -> Tensor:
        if self.beta == 1.0:
            return dt * slope
        self.velocity = (
            slope if self.velocity is None else (1 - self.beta) * self.velocity + self.beta * slope
        )
        return dt * self.velocity


def _report(
    callback: Callback | None, i: int, sigmas: Tensor, x: Tensor, denoised: Tensor, model, part
) -> None:
    if callback is not None:
        callback(
            {
                "i": i,
                "sigma": sigmas[i],
                "sigma_next": sigmas[i + 1],
                "x": x,
                "denoised": denoised,
                "nfe": model.calls,
                "grad_evals": part.evals,
            }
        )


def _check_knobs(base: str, order: int | None, beta: float) -> _BaseStepper:
    check_range("sampler.beta", beta, low=0, high=1, low_inclusive=False)
    return make_base(base, order)


@register("ltsp", order=1)
def sample_ltsp(
    denoiser: Any,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: dict | None = None,
    guidance: GuidanceFn | None = None,
    generator: Any = None,
    callback: Callback | None = None,
    base: str = "plms",
    order: int | None = None,
    beta: float = 1.0,
    cond_first: bool = True,
) -> Tensor:
    """Lie-Trotter splitting: an Euler step of ``g`` then a ``base`` step of ``f`` (or the reverse).

    ``base`` / ``order``: the multistep solver of the diffusion part (:data:`BASES`; order ``None`` =
    its default). ``beta``: heavy-ball damping of the conditional steps (1 = plain Euler).
    Both sub-steps of step ``i`` start at ``sigmas[i]``; ``g`` is never evaluated at sigma = 0.
    """
    stepper = _check_knobs(base, order, beta)
    part = _Conditional(check_conditional("ltsp", guidance), beta)
    model = bind(denoiser, cond, None)
    levels = sigmas.tolist()
    for i in range(len(sigmas) - 1):
        sigma, h = sigmas[i], sigmas[i + 1] - sigmas[i]
        if cond_first:
            x = part.advance(x, h, part(x, sigma))
        denoised = model(x, sigma)
        x = stepper.step(x, i, sigmas, levels, denoised)
        if not cond_first:
            x = part.advance(x, h, part(x, sigma))
        _report(callback, i, sigmas, x, denoised, model, part)
    return x


@register("stsp", order=2)
def sample_stsp(
    denoiser: Any,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: dict | None = None,
    guidance: GuidanceFn | None = None,
    generator: Any = None,
    callback: Callback | None = None,
    base: str = "plms",
    order: int | None = None,
    beta: float = 1.0,
    corrector: bool = True,
    model_at: str = "grid",
) -> Tensor:
    """Strang splitting: half a step of ``g``, a full ``base`` step of ``f``, half a step of ``g``.

    ``corrector``: close with implicit Euler at ``sigmas[i + 1]`` (one predictor-corrector pass whose
    corrector slope also opens the next step) rather than explicit Euler at the new state.
    ``model_at``: ``grid`` evaluates the model at the step's starting state and carries the opening
    half step through the base's linear part; ``opened`` evaluates it after the opening half step
    (the literal composition). Second order needs both defaults (see the module docstring). On the
    last step of a grid ending at 0 the closing half is explicit Euler at the step's midpoint sigma,
    so ``g`` is never evaluated at sigma = 0.
    """
    check_choice("sampler.model_at", model_at, MODEL_AT)
    stepper = _check_knobs(base, order, beta)
    part = _Conditional(check_conditional("stsp", guidance), beta)
    model = bind(denoiser, cond, None)
    levels = sigmas.tolist()
    steps = len(sigmas) - 1
    opening = part(x, sigmas[0]) if steps else None
    for i in range(steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        half = (sigma_next - sigma) / 2
        if model_at == "grid":
            denoised = model(x, sigma)
            opened = stepper.carry(part.increment(half, opening), i, sigmas)
            y = stepper.step(x, i, sigmas, levels, denoised) + opened
        else:
            x = part.advance(x, half, opening)
            denoised = model(x, sigma)
            y = stepper.step(x, i, sigmas, levels, denoised)
        if levels[i + 1] == 0:
            x = part.advance(y, half, part(y, sigma + half))
        elif corrector:
            opening = part(y + half * part(y, sigma_next), sigma_next)
            x = part.advance(y, half, opening)
        else:
            x = part.advance(y, half, part(y, sigma_next))
            opening = part(x, sigma_next) if i + 1 < steps else None
        _report(callback, i, sigmas, x, denoised, model, part)
    return x
