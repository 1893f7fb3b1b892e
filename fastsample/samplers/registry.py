"""The sampler registry: name -> function, its NFE for a step count and what kind of solver it is."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

from fastsample.utils.errors import fail

SamplerFn = Callable[..., object]


@dataclass(frozen=True)
class SamplerSpec:
    """A registered sampler: its function, NFE rule, order (ODE solvers) and stochasticity."""

    name: str
    fn: SamplerFn
    #: ``nfe(steps)``, or ``nfe(steps, **knobs)`` for samplers whose cost depends on their knobs
    nfe: Callable[..., int]
    order: int | None
    stochastic: bool
    defaults: tuple[tuple[str, object], ...] = ()

    def knobs(self) -> dict[str, object]:
        """Keyword-only settings of the function with their defaults (registry overrides applied)."""
        params = inspect.signature(self.fn).parameters
        reserved = {"cond", "guidance", "generator", "callback"}
        knobs = {
            name: p.default
            for name, p in params.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in reserved
        }
        knobs.update(dict(self.defaults))
        return knobs

    def count_nfe(self, steps: int, knobs: dict[str, object] | None = None) -> int:
        """Model calls for ``steps`` steps on a grid ending at 0, with ``knobs`` (default: the defaults).

        A rule that accepts keywords (e.g. Restart's, whose cost depends on its intervals) is called
        with all of the sampler's knobs; a plain ``nfe(steps)`` rule with the step count only.
        """
        params = inspect.signature(self.nfe).parameters.values()
        if any(p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD) for p in params):
            return int(self.nfe(steps, **{**self.knobs(), **(knobs or {})}))
        return int(self.nfe(steps))


SAMPLERS: dict[str, SamplerSpec] = {}


def one_call_per_step(steps: int) -> int:
    return steps


def register(
    name: str,
    *,
    nfe: Callable[..., int] = one_call_per_step,
    order: int | None = None,
    stochastic: bool = False,
    **defaults: object,
) -> Callable[[SamplerFn], SamplerFn]:
    """Register ``fn`` under ``name``; ``defaults`` override its keyword defaults for this name.

    ``nfe`` is the model-call count for a step count (grid ending at 0): ``nfe(steps)``, or
    ``nfe(steps, *, knob=..., **_)`` when the count depends on the knobs (see
    :meth:`SamplerSpec.count_nfe`).
    """

    def decorate(fn: SamplerFn) -> SamplerFn:
        SAMPLERS[name] = SamplerSpec(name, fn, nfe, order, stochastic, tuple(defaults.items()))
        return fn

    return decorate


def get_sampler(name: str) -> SamplerSpec:
    """Look up a sampler by name, failing with the list of known names."""
    if name not in SAMPLERS:
        fail(f"sampler.name={name!r} is not a known sampler; choose one of: {', '.join(sorted(SAMPLERS))}")
    return SAMPLERS[name]
