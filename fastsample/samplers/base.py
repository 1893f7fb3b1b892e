"""``BaseSampler``: the one protocol every sampler object follows, and the run loop they share.

Every sampler that ``conf/sampler/*.yaml`` builds (the registry :class:`~fastsample.samplers.Sampler`,
ES-DDPM, diffusers schedulers, learned GGDM samplers, DSNO operators) is used the same way by
``sample.py``, the Evaluator, schedule search and the benchmarks::

    sampler.name, sampler.steps, sampler.schedule, sampler.knobs, sampler.nfe
    sampler.sigmas(model)                                  # the grid a batch runs on
    sampler.sample(model, noise, cond=..., guidance=..., generator=..., sigmas=...)
    sampler.run(model, x, sigmas, ...)                     # from a given state at sigmas[0]

:class:`BaseSampler` implements ``sample`` and ``run`` once. Both apply the same two rules: the
grad rule (no autograd graph unless ``grad=True`` or the start state already requires grad) and the
non-finite guard (:func:`~fastsample.samplers.common.guard_states`: a NaN / inf state after any step
raises :class:`~fastsample.utils.errors.NumericalError` naming the step). A subclass states only what
differs, through these hooks:

* :meth:`~BaseSampler._integrate` (required): the steps from a state at ``sigmas[0]`` to the end;
* :meth:`~BaseSampler._start`: the start state of :meth:`~BaseSampler.sample` from standard normal
  noise (default ``sigmas[0] * noise``);
* :meth:`~BaseSampler._sampling_sigmas`: the grid :meth:`~BaseSampler.sample` runs on (default
  :meth:`~BaseSampler.sigmas` unless one is given);
* :meth:`~BaseSampler._enter`: a state given to :meth:`~BaseSampler.run` in the integrator's own
  variables (default: unchanged; diffusers schedulers step in their latent space).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import Tensor

from fastsample.samplers.common import Callback, GuidanceFn, guard_states


class BaseSampler(ABC):
    """A configured sampler: settings, a sigma grid per model, and the guarded run loop.

    Attributes every sampler has: ``name``, ``steps``, ``schedule`` (a ScheduleSpec or what describes
    the levels), ``knobs`` (its settings, as recorded in run.json) and :attr:`nfe`.
    """

    name: str
    steps: int
    schedule: Any
    knobs: dict[str, Any]

    #: keyword options of :meth:`sample` that choose the start state (passed to :meth:`_start`);
    #: any other option goes to :meth:`_integrate`
    start_options: ClassVar[tuple[str, ...]] = ()

    @property
    @abstractmethod
    def nfe(self) -> int:
        """Model calls (network evaluations) for one batch."""

    @abstractmethod
    def sigmas(self, model: Any) -> Tensor:
        """The float64 grid a batch runs on for ``model``: ``steps + 1`` levels ending at 0."""

    # -- the protocol ------------------------------------------------------------------------------
    def run(
        self,
        denoiser: Any,
        x: Tensor,
        sigmas: Tensor,
        *,
        cond: dict | None = None,
        guidance: GuidanceFn | None = None,
        generator: Any = None,
        callback: Callback | None = None,
        grad: bool = False,
        **options: Any,
    ) -> Tensor:
        """Integrate from ``x`` at ``sigmas[0]`` along ``sigmas`` (any start level the sampler allows).

        Each step's state is checked for NaN / inf; ``options`` are the sampler's own run settings.
        """
        state = self._enter(denoiser, x, sigmas)
        return self._guarded(denoiser, state, sigmas, cond, guidance, generator, callback, grad, options)

    def sample(
        self,
        denoiser: Any,
        noise: Tensor,
        *,
        cond: dict | None = None,
        guidance: GuidanceFn | None = None,
        generator: Any = None,
        callback: Callback | None = None,
        sigmas: Tensor | None = None,
        grad: bool = False,
        **options: Any,
    ) -> Tensor:
        """Sample from standard normal ``noise``: start at :meth:`_start`'s state and run to sigma = 0."""
        start_options = {key: options.pop(key) for key in self.start_options if key in options}
        sigmas = self._sampling_sigmas(denoiser, sigmas)
        state = self._start(denoiser, noise, sigmas, cond=cond, generator=generator, **start_options)
        return self._guarded(denoiser, state, sigmas, cond, guidance, generator, callback, grad, options)

    def _guarded(
        self,
        denoiser: Any,
        state: Tensor,
        sigmas: Tensor | None,
        cond: dict | None,
        guidance: GuidanceFn | None,
        generator: Any,
        callback: Callback | None,
        grad: bool,
        options: dict[str, Any],
    ) -> Tensor:
        # Sampling needs no graph (it would hold every state); a start state that requires grad means
        # the caller differentiates through the sampler (schedule search, DDSS), so keep it then.
        with torch.set_grad_enabled(grad or torch.is_grad_enabled() and state.requires_grad):
            return self._integrate(
                denoiser,
                state,
                sigmas,
                cond=cond,
                guidance=guidance,
                generator=generator,
                callback=guard_states(callback),
                **options,
            )

    # -- the hooks ---------------------------------------------------------------------------------
    @abstractmethod
    def _integrate(
        self,
        denoiser: Any,
        x: Tensor,
        sigmas: Tensor,
        *,
        cond: dict | None,
        guidance: GuidanceFn | None,
        generator: Any,
        callback: Callback,
        **options: Any,
    ) -> Tensor:
        """The steps from ``x`` at ``sigmas[0]`` to the last level; report each step to ``callback``.

        Called under the grad rule; ``callback`` already checks every reported state for NaN / inf.
        """

    def _start(
        self,
        denoiser: Any,
        noise: Tensor,
        sigmas: Tensor,
        *,
        cond: dict | None = None,
        generator: Any = None,
    ) -> Tensor:
        """The start state of :meth:`sample`: ``sigmas[0] * noise``."""
        return noise * float(sigmas[0])

    def _sampling_sigmas(self, denoiser: Any, sigmas: Tensor | None) -> Tensor | None:
        """The grid :meth:`sample` runs on: ``sigmas`` if given, else :meth:`sigmas` for the model."""
        return self.sigmas(denoiser) if sigmas is None else sigmas

    def _enter(self, denoiser: Any, x: Tensor, sigmas: Tensor) -> Tensor:
        """A state given to :meth:`run` in the variables :meth:`_integrate` steps (unchanged here)."""
        return x
