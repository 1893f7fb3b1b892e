"""GGDM: a K-step sampler whose coefficients, noise scales and timesteps are learned (DDSS).

Generalized Gaussian Diffusion Models (Watson et al., ICLR 2022), written in sigma space
(``x = x0 + sigma * eps``). Step ``i`` (``i = 0 .. K-1``) goes from level ``s_i`` to ``s_{i+1}``
(``s_K = 0``) with one model call ``D_i = D(x_i, s_i)``:

    x_{i+1} = sum_{j<=i} mu_ij x_j + sum_{j<=i} nu_ij D_j + c_i z_i

This is the paper's family: its VP states are these states times ``1 / sqrt(1 + s^2)``, so any VP
sampler of the family is one of these with rescaled coefficients. Plain GGDM learns every ``mu_ij`` and
``nu_ii``; ``learn_pred`` (+PRED) adds every earlier prediction ``nu_ij``; ``learn_time`` (+TIME) learns
the levels ``s_1 .. s_{K-1}``; ``learn_noise`` learns ``c_i``. NFE = K.

Parametrization, and why:

* Around DDIM at the current levels: ``mu_ii = (s_{i+1} / s_i) sech(p_i)``, ``nu_ii = 1 - mu_ii``,
  ``c_i = s_{i+1} tanh(p_i)``. This is DDIM(eta) (``tanh^2 + sech^2 = 1`` keeps the step's noise level
  at ``s_{i+1}``); ``p = 0`` is deterministic DDIM. ``tanh`` rather than softplus / sigmoid: the noise is
  exactly 0 at initialization yet its gradient is not (the sign of ``c_i`` is irrelevant, ``z`` is
  symmetric), and ``|c_i| < s_{i+1}`` always.
* Learned residuals in units of the states' sizes: ``mu_ij += a_ij r(s_{i+1}) / r(s_j)``,
  ``nu_ij += b_ij r(s_{i+1}) / sigma_data`` with ``r(s) = sqrt(s^2 + sigma_data^2)`` (the typical size
  of a state at level ``s``): a unit change of any raw parameter moves ``x_{i+1}`` by about its own size at
  every level, so one learning rate fits all of them. All residuals start at 0, so the initial sampler
  is DDIM on the initial grid, to rounding.
* Levels, monotone and in range by construction: ``s_0`` (where the prior noise enters) is fixed; the
  others live in ``u = s^(1 / rho)`` as ``u_i = u_0 * sum_{m >= i} softmax(w)_m`` over ``K`` logits, where
  ``softmax(w)_m`` (floored at ``MIN_GAP``, so underflow cannot merge levels) is the gap from ``u_m``
  down to ``u_{m+1}`` (``u_K = 0``). Every gap is positive for any ``w``, so
  ``s_0 > s_1 > ... > s_{K-1} > 0`` always; ``w`` starts at the log of the initial grid's gaps.

A learned sampler is saved with its backbone's identity (class, data shape and a hash of its weights)
and refuses to run on another backbone or to load as another step count.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as checkpoint_call

from fastsample.diffusion.denoiser import CountingDenoiser
from fastsample.diffusion.schedules import ScheduleSpec, make_sigmas, validate_sigmas
from fastsample.samplers.base import BaseSampler
from fastsample.samplers.common import Callback, GuidanceFn, bind, report
from fastsample.utils.errors import check_range, fail
from fastsample.utils.hashing import module_hash
from fastsample.utils.io import save_torch_atomic
from fastsample.utils.seeding import randn_like

GGDM_FORMAT = "fastsample-ggdm-v1"
MIN_GAP = 1e-6  # the smallest gap between learned levels, as a fraction of u_0 = s_0^(1 / rho)


@dataclass
class LearnedSchedule:
    """What ``describe_run`` reports as the schedule of a learned sampler (its current levels)."""

    kind: str = "ggdm"
    sigmas: list[float] = field(default_factory=list)


def backbone_identity(denoiser: Any) -> dict[str, Any]:
    """What identifies a backbone: its description and a hash of its weights, taken in float32.

    float32 makes the hash independent of the precision a model runs in (``precision=float64`` runs its
    ``.double()`` copy) and of last-bit differences between equal float64 models (a Gaussian mixture
    re-read from its cache differs from the fresh fit in the last bit of its weights); a
    :class:`CountingDenoiser` is looked through.
    """
    while isinstance(denoiser, CountingDenoiser):
        denoiser = denoiser.inner
    if not isinstance(denoiser, nn.Module):
        fail(f"a GGDM sampler needs an nn.Module backbone (a Denoiser), got {type(denoiser).__name__}")
    description = denoiser.identity() if callable(getattr(denoiser, "identity", None)) else {}
    description = {"class": type(denoiser).__name__, **description}
    if description.get("image_shape") is not None:
        description["image_shape"] = list(description["image_shape"])
    return {"description": description, "weights": module_hash(denoiser, dtype=torch.float32)}


def _schedule_spec(schedule: ScheduleSpec | dict | str | None) -> ScheduleSpec:
    if schedule is None or isinstance(schedule, str):
        return ScheduleSpec(kind=schedule or "quadratic")
    if isinstance(schedule, ScheduleSpec):
        return schedule
    return ScheduleSpec(**{key: value for key, value in dict(schedule).items() if value is not None})


class GGDMSampler(BaseSampler, nn.Module):
    """A K-step GGDM sampler (an ``nn.Module``: its parameters are what DDSS learns).

    Used like :class:`fastsample.samplers.Sampler` (both are
    :class:`~fastsample.samplers.base.BaseSampler`): ``sample(denoiser, noise, cond=..., generator=...)``
    starts at ``s_0 * noise``; ``nfe`` is K; ``sample`` / ``run`` take ``checkpoint=True`` (see
    :meth:`_integrate`). Parameters are float64 (there are ``O(K^2)`` of them) and
    the coefficients are cast to the state's dtype, so float32 and float64 runs share one sampler.

    Args:
        sigmas: the initial grid, ``K + 1`` strictly decreasing levels ending at 0 (DDIM's grid).
        sigma_data: the data's scale in ``r(s) = sqrt(s^2 + sigma_data^2)`` (the backbone's).
        learn_pred: +PRED: coefficients on every earlier prediction (else only the current one).
        learn_time: +TIME: learn the levels ``s_1 .. s_{K-1}``.
        learn_noise: learn the noise scales ``c_i`` (DDIM(eta)-style, see the module doc).
        rho: the level variable ``u = s^(1 / rho)`` of +TIME (EDM's ramp variable).
        init: how the initial grid was chosen (recorded, e.g. ``quadratic``).
    """

    name = "ggdm"

    def __init__(
        self,
        sigmas: Tensor | list[float],
        *,
        sigma_data: float = 0.5,
        learn_pred: bool = True,
        learn_time: bool = True,
        learn_noise: bool = True,
        rho: float = 7.0,
        init: str = "explicit",
    ) -> None:
        super().__init__()
        grid = validate_sigmas(torch.as_tensor(sigmas, dtype=torch.float64).tolist())
        check_range("sampler.sigma_data", sigma_data, low=0, low_inclusive=False)
        check_range("sampler.rho", rho, low=0, low_inclusive=False)
        self.steps = steps = len(grid) - 1
        self.sigma_data, self.rho, self.init = float(sigma_data), float(rho), init
        self.learn_pred, self.learn_noise = bool(learn_pred), bool(learn_noise)
        self.learn_time = bool(learn_time) and steps > 1  # one step has no free level
        self.register_buffer("init_sigmas", grid)
        rows, cols = torch.tril_indices(steps, steps)
        self.register_buffer("_tril", torch.stack([rows, cols]), persistent=False)
        diagonal = torch.arange(steps)
        self.register_buffer("_diag", torch.stack([diagonal, diagonal]), persistent=False)
        f64 = torch.float64
        # residuals around DDIM; all zero at initialization
        self.state_coef = nn.Parameter(torch.zeros(rows.numel(), dtype=f64))
        self.pred_coef = nn.Parameter(torch.zeros(rows.numel() if learn_pred else steps, dtype=f64))
        self.noise_param = (
            nn.Parameter(torch.zeros(steps - 1, dtype=f64)) if learn_noise and steps > 1 else None
        )
        self.time_logits = None
        if self.learn_time:
            u = grid[:-1] ** (1 / self.rho)
            gaps = torch.cat([u[:-1] - u[1:], u[-1:]]) / u[0]  # K gaps summing to 1, the last down to u = 0
            if float(gaps.min()) <= MIN_GAP:
                fail(f"the initial grid's levels are too close together for +TIME: {grid.tolist()}")
            # the inverse of levels(): softmax(log q) = q because q sums to 1
            self.time_logits = nn.Parameter(((gaps - MIN_GAP) / (1 - steps * MIN_GAP)).log())
        self.backbone: dict[str, Any] | None = None  # set by bind_backbone / load
        self.path: str | None = None
        self.metadata: dict[str, Any] = {}
        # id -> weak reference: an id alone may be reused by a new model once the old one is freed
        self._checked: dict[int, weakref.ref] = {}

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_schedule(
        cls,
        model: Any,
        steps: int,
        schedule: ScheduleSpec | dict | str | None = "quadratic",
        **settings: Any,
    ) -> GGDMSampler:
        """DDIM on ``schedule``'s grid for ``model`` (e.g. ``quadratic`` or ``time_uniform`` times), bound
        to ``model`` as its backbone."""
        check_range("sampler.steps", steps, low=1)
        spec = _schedule_spec(schedule)
        settings.setdefault("sigma_data", float(getattr(model, "sigma_data", 0.5)))
        sampler = cls(make_sigmas(spec, steps, model), init=spec.kind, **settings)
        return sampler.bind_backbone(model)

    def settings(self) -> dict[str, Any]:
        """The constructor's settings (saved with the parameters)."""
        return {
            "sigma_data": self.sigma_data,
            "learn_pred": self.learn_pred,
            "learn_time": self.learn_time,
            "learn_noise": self.learn_noise,
            "rho": self.rho,
            "init": self.init,
        }

    # -- the parametrization -----------------------------------------------------------------------
    def levels(self) -> Tensor:
        """The ``K + 1`` levels (float64, differentiable in the +TIME logits), ending at 0."""
        if self.time_logits is None:
            return self.init_sigmas
        u0 = self.init_sigmas[0] ** (1 / self.rho)
        # a floor under every gap: levels stay strictly decreasing and positive even when softmax underflows
        gaps = MIN_GAP + (1 - self.steps * MIN_GAP) * self.time_logits.softmax(dim=0)
        # u_i = u_0 * (sum of the gaps below level i): a reversed cumulative sum, so no cancellation
        remaining = gaps.flip(0).cumsum(0).flip(0)[1:]
        positive = torch.cat([u0.reshape(1), u0 * remaining]) ** self.rho
        positive = torch.cat([self.init_sigmas[:1], positive[1:]])  # s_0 exactly as given
        return torch.cat([positive, positive.new_zeros(1)])

    def coefficients(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(levels, mu, nu, c)``: float64, ``mu`` / ``nu`` (K, K) lower triangular, ``c`` (K,)."""
        steps, levels = self.steps, self.levels()
        current, following = levels[:-1], levels[1:]
        size = (levels**2 + self.sigma_data**2).sqrt()  # r(s): a state's typical size at level s
        noise = self.noise_param if self.noise_param is not None else current.new_zeros(steps - 1)
        noise = torch.cat([noise, noise.new_zeros(1)])  # the last step lands on 0: no noise
        keep = (following / current) / noise.cosh()  # sqrt(s_{i+1}^2 - c_i^2) / s_i
        mu = torch.diag(keep)
        nu = torch.diag(1 - keep)
        rows, cols = self._tril
        mu = mu.index_put((rows, cols), self.state_coef * size[rows + 1] / size[cols], accumulate=True)
        rows, cols = self._tril if self.learn_pred else self._diag
        nu = nu.index_put((rows, cols), self.pred_coef * size[rows + 1] / self.sigma_data, accumulate=True)
        return levels, mu, nu, following * noise.tanh()

    # -- sampling ----------------------------------------------------------------------------------
    @property
    def nfe(self) -> int:
        """Model calls per batch: one per step."""
        return self.steps

    @property
    def schedule(self) -> LearnedSchedule:
        return LearnedSchedule(sigmas=[round(s, 6) for s in self.levels().detach().tolist()])

    @property
    def knobs(self) -> dict[str, Any]:
        return {**self.settings(), "path": self.path}

    def sigmas(self, model: Any = None) -> Tensor:
        """The current levels (float64, detached), like :meth:`Sampler.sigmas`."""
        return self.levels().detach().clone()

    # -- the hooks of BaseSampler -------------------------------------------------------------------
    def _start(
        self,
        denoiser: Any,
        noise: Tensor,
        sigmas: Tensor,
        *,
        cond: dict | None = None,
        generator: Any = None,
    ) -> Tensor:
        """``s_0 * noise``. ``s_0`` is fixed, not learned: read from the buffer, as ``levels()[0]`` would
        make the start state require grad (and so build a graph) whenever +TIME is on."""
        return noise * self.init_sigmas[0].to(noise.dtype)

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
        checkpoint: bool = False,
    ) -> Tensor:
        """Run the K steps from ``x`` at level ``s_0``. ``checkpoint`` recomputes each model call in the
        backward pass (gradient rematerialization): memory then grows with ``K * |x|``, not with the
        network's activations.

        Fails when ``denoiser`` is not the backbone the sampler was learned for. The levels are part of
        what was learned: ``sigmas`` must be the sampler's own (:meth:`sigmas`).

        The combinations are sums of scalar * state products on purpose: stacking the history into one
        tensor per step would make autograd keep ``O(K^2)`` copies of the states.
        """
        self.check_levels(sigmas)
        self.check_backbone(denoiser)
        model = bind(denoiser, cond, guidance)
        levels, mu, nu, noise_scale = (t.to(x.dtype) for t in self.coefficients())
        states: list[Tensor] = [x]
        preds: list[Tensor] = []
        for i in range(self.steps):
            if checkpoint and torch.is_grad_enabled():
                denoised = checkpoint_call(model, x, levels[i], use_reentrant=False)
            else:
                denoised = model(x, levels[i])
            preds.append(denoised)
            x = self._combine(i, mu, nu, states, preds)
            if self.noise_param is not None and i < self.steps - 1:
                x = x + noise_scale[i] * randn_like(x, generator)
            states.append(x)
            report(callback, i, levels.detach(), x, denoised)
        return x

    def _combine(self, i: int, mu: Tensor, nu: Tensor, states: list[Tensor], preds: list[Tensor]) -> Tensor:
        """``sum_j mu_ij x_j + sum_j nu_ij D_j`` of step ``i`` (earlier predictions only with +PRED)."""
        x = nu[i, i] * preds[i]
        for j in range(i + 1):
            x = x + mu[i, j] * states[j]
            if self.learn_pred and j < i:
                x = x + nu[i, j] * preds[j]
        return x

    def check_levels(self, sigmas: Tensor) -> None:
        """Fail unless ``sigmas`` are the sampler's own levels (they are learned, not configurable)."""
        own = self.levels().detach()
        given = torch.as_tensor(sigmas, dtype=own.dtype, device=own.device)
        if given.shape != own.shape or not torch.allclose(given, own, rtol=1e-6, atol=0):
            fail("a GGDM sampler's levels are learned; do not pass other sigmas (sampler.schedule) to it")

    # -- backbone identity -------------------------------------------------------------------------
    def bind_backbone(self, denoiser: Any) -> GGDMSampler:
        """Record ``denoiser`` as the backbone this sampler belongs to."""
        self.backbone = backbone_identity(denoiser)
        self._checked = {}
        self._remember_checked(denoiser)
        return self

    def _remember_checked(self, denoiser: Any) -> None:
        with contextlib.suppress(TypeError):  # not weak-referenceable: hashed again next time
            self._checked[id(denoiser)] = weakref.ref(denoiser)

    def _already_checked(self, denoiser: Any) -> bool:
        reference = self._checked.get(id(denoiser))
        return reference is not None and reference() is denoiser

    def check_backbone(self, denoiser: Any) -> None:
        """Fail unless ``denoiser`` is the recorded backbone (hashed once per denoiser object)."""
        if self.backbone is None or self._already_checked(denoiser):
            return
        found = backbone_identity(denoiser)
        if found["weights"] != self.backbone["weights"]:
            where = f"sampler.path={self.path!r}" if self.path else "this GGDM sampler"
            fail(
                f"{where} was learned for backbone {_describe(self.backbone)}, but the model is "
                f"{_describe(found)}; learn a sampler for this model with train.py task=ddss"
            )
        self._remember_checked(denoiser)

    # -- files ---------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, **metadata: Any) -> Path:
        """Write the sampler (parameters, settings, backbone identity, ``metadata``) atomically."""
        if self.backbone is None:
            fail("a GGDM sampler must be bound to its backbone (bind_backbone) before it is saved")
        content = {
            "format": GGDM_FORMAT,
            "steps": self.steps,
            "settings": self.settings(),
            "backbone": self.backbone,
            "levels": self.levels().detach().cpu().tolist(),
            "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()},
            "metadata": metadata,
        }
        save_torch_atomic(path, content)
        return Path(path)

    @classmethod
    def load(
        cls, path: str | os.PathLike, steps: int | None = None, setting: str = "sampler.path"
    ) -> GGDMSampler:
        """Read a sampler written by :meth:`save`; ``steps`` (if given) must be the file's K."""
        path = Path(path)
        if not path.is_file():
            fail(f"{setting}={str(path)!r} does not exist; give a learned sampler file (train.py task=ddss)")
        try:
            content = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:  # truncated / not a torch file
            fail(f"{setting}={str(path)!r} is not a readable file ({type(err).__name__}: {err})")
        if not isinstance(content, dict) or content.get("format") != GGDM_FORMAT:
            fail(f"{setting}={str(path)!r} is not a learned GGDM sampler (train.py task=ddss writes one)")
        if steps is not None and int(steps) != content["steps"]:
            fail(
                f"{setting}={str(path)!r} was learned for K={content['steps']} steps, but "
                f"sampler.steps={steps}; use sampler.steps={content['steps']} (or null) "
                f"or learn a {steps}-step sampler"
            )
        state = content["state_dict"]
        sampler = cls(state["init_sigmas"], **content["settings"])
        sampler.load_state_dict(state)
        sampler.backbone = content["backbone"]
        sampler.path = str(path)
        sampler.metadata = content.get("metadata", {})
        return sampler.eval().requires_grad_(False)

    def extra_repr(self) -> str:
        flags = [name for name in ("learn_pred", "learn_time", "learn_noise") if getattr(self, name)]
        return f"steps={self.steps}, init={self.init!r}, learned={'+'.join(flags) or 'coefficients'}"


def _describe(identity: dict[str, Any]) -> str:
    description = identity.get("description", {})
    shape = description.get("image_shape")
    shape_text = f" {list(shape)}" if shape is not None else ""
    return f"{description.get('class', '?')}{shape_text} (weights {identity.get('weights')})"


def load_ggdm(path: str | os.PathLike, steps: int | None = None) -> GGDMSampler:
    """``conf/sampler/ggdm.yaml``: a learned sampler for ``sample.py`` / evaluation (NFE = K)."""
    return GGDMSampler.load(path, steps)
