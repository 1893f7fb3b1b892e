"""What every guidance task shares: conditional functions, the per-batch setup and cost counters.

Two kinds of guidance exist (see docs/guidance.md):

* a *conditional function* ``g(x, sigma)`` added to the probability-flow ODE,
  ``dx/dsigma = (x - D(x, sigma)) / sigma + g(x, sigma)`` (classifier guidance, data consistency of
  inverse problems). Plain samplers integrate the summed field (``D - sigma * g``, see
  :class:`fastsample.samplers.common.BoundModel`); splitting samplers integrate the two parts apart.
* a *denoiser wrapper* that changes ``D`` itself (classifier-free guidance, projection onto the
  measurements of an inverse problem).

A :class:`GuidanceTask` is what ``conf/guidance/*.yaml`` builds: settings only. For each batch of
seeds, :meth:`GuidanceTask.setup` binds what is per sample (target classes, measurements) and returns
a :class:`GuidedRun`: the denoiser to integrate, its condition and the conditional function.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fastsample.diffusion.denoiser import (
    append_dims,
    expand_sigma,
)
from fastsample.utils.errors import check_range, fail


def check_scale(setting: str, scale: float) -> float:
    """A guidance scale: a finite number >= 0 (0 switches the guidance off)."""
    try:
        value = float(scale)
    except (TypeError, ValueError):
        fail(f"{setting}={scale!r} is not a number; use a guidance scale >= 0")
    if value != value or value in (float("inf"), float("-inf")):
        fail(f"{setting}={scale!r} is not allowed; use a finite guidance scale >= 0")
    check_range(setting, value, low=0)
    return value


#: guidance scales above this are far outside what guided sampling is used with (docs/guidance.md
#: uses 0-20; at 1000 most pixels of an 8x8-digits mixture saturate and at 1e6 the field overflows)
EXTREME_SCALE = 30.0


class ExtremeGuidanceWarning(UserWarning):
    """A guidance scale so large that the samples are likely saturated garbage."""


def warn_extreme_scale(setting: str, scale: float, limit: float = EXTREME_SCALE) -> None:
    """Warn (once per run) when ``scale`` exceeds ``limit``; non-finite results still fail later."""
    if scale > limit:
        warnings.warn(
            f"{setting}={scale:g} is far above the usual range 0-{limit:g}: samples are likely saturated "
            "(clipped to black / white) or overflow to NaN; lower the scale, or use more steps "
            "(sampler=ltsp / stsp integrate strong guidance more stably)",
            ExtremeGuidanceWarning,
            stacklevel=3,
        )


@dataclass
class GuidanceStats:
    """Costs of the conditional part: gradient evaluations of ``g`` and denoiser calls made inside ``g``.

    One evaluation is one batched call of ``g`` (one backward pass), whatever the batch size.
    """

    grad_evals: int = 0
    model_calls: int = 0

    def reset(self) -> None:
        self.grad_evals = 0
        self.model_calls = 0

    def as_dict(self) -> dict[str, int]:
        return {"grad_evals": self.grad_evals, "guidance_model_calls": self.model_calls}


class ConditionalFunction:
    """``g(x, sigma, denoised=None) -> Tensor``: a term of ``dx/dsigma``, with a scale and a counter.

    Subclasses implement :meth:`field` (the term for ``scale``, computed with autograd enabled even
    inside ``torch.no_grad``). With ``scale == 0`` the call returns zeros without any evaluation, so a
    splitting sampler at scale 0 is exactly its base solver. ``denoised`` (the summed-field samplers
    pass it) is not needed by any function here: splitting samplers call ``g`` where no denoised
    estimate exists and pass ``None``.
    """

    #: setting name used in error messages
    setting = "guidance.scale"

    def __init__(self, scale: float, stats: GuidanceStats | None = None) -> None:
        self.scale = check_scale(self.setting, scale)
        self.stats = stats if stats is not None else GuidanceStats()

    def __call__(self, x: Tensor, sigma: Tensor | float, denoised: Tensor | None = None) -> Tensor:
        if self.scale == 0:
            return torch.zeros_like(x)
        self.stats.grad_evals += 1
        with torch.enable_grad():
            return self.field(x.detach(), torch.as_tensor(sigma, dtype=x.dtype, device=x.device)).detach()

    def field(self, x: Tensor, sigma: Tensor) -> Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class GuidanceBatch:
    """What :meth:`GuidanceTask.setup` is given about one batch besides the model and the labels.

    ``shape`` is the data shape asked for, else the model's ``image_shape`` (None if neither is known).
    """

    seeds: list[int]
    shape: tuple[int, ...] | None
    device: torch.device | str = "cpu"
    dtype: torch.dtype = torch.float32


@dataclass
class GuidedRun:
    """One batch's guided problem: integrate ``denoiser`` (with ``cond``) plus ``guidance``.

    ``labels`` are the target classes used (classifier guidance, CFG); ``measurement`` / ``reference``
    the measurement ``y`` and the clean images it was taken from (inverse problems), for reporting.
    """

    denoiser: Any
    cond: dict[str, Any] | None = None
    guidance: ConditionalFunction | None = None
    labels: Tensor | None = None
    measurement: Tensor | None = None
    reference: Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)


class GuidanceTask:
    """Settings of one kind of guidance; :meth:`setup` binds them to a model and a batch of seeds.

    Class attributes describe the task for the entry points: ``kind`` ("field": a conditional function
    for the ODE; "wrapper": a denoiser wrapper), ``needs_labels`` (target classes per sample).
    """

    name = "guidance"
    kind = "field"
    needs_labels = False

    def __init__(self, scale: float) -> None:
        self.scale = check_scale("guidance.scale", scale)
        warn_extreme_scale("guidance.scale", self.scale)
        self.stats = GuidanceStats()

    @property
    def conditional(self) -> bool:
        """Whether a run has a conditional function ``g`` (what splitting samplers integrate)."""
        return self.kind == "field"

    def num_classes(self, model: Any) -> int | None:
        """How many classes the targets range over (the model's by default)."""
        return getattr(model, "num_classes", None)

    def setup(
        self,
        model: Any,
        *,
        seeds: list[int],
        labels: Tensor | None = None,
        shape: tuple[int, ...] | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> GuidedRun:
        """Bind the settings to ``model`` and one batch of ``seeds``: the guided problem to integrate.

        The steps every task shares: :meth:`prepare`, then the target labels (``labels``, else
        ``seed mod classes``, for tasks that ``needs_labels``; the given ``labels`` otherwise), then the
        task's own :meth:`guided_run`, whose ``labels`` are set to those targets.
        """
        found = tuple(shape) if shape is not None else getattr(model, "image_shape", None)
        batch = GuidanceBatch(list(seeds), tuple(found) if found is not None else None, device, dtype)
        self.prepare(model, batch)
        targets = self.target_labels(model, seeds, labels, device) if self.needs_labels else labels
        run = self.guided_run(model, targets, batch)
        run.labels = targets
        return run

    def prepare(self, model: Any, batch: GuidanceBatch) -> None:
        """Check that ``model`` can take this guidance and move what the task holds to ``batch.device``
        (before the targets are drawn, so a wrong model fails first); nothing by default."""

    def guided_run(self, model: Any, labels: Tensor | None, batch: GuidanceBatch) -> GuidedRun:
        """The task's guided problem for ``model``, the batch's target ``labels`` and ``batch``."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What the run used: recorded in run.json and the benchmarks."""
        return {"name": self.name, "kind": self.kind, "scale": self.scale}

    def target_labels(self, model: Any, seeds: list[int], labels: Tensor | None, device: Any) -> Tensor:
        """``labels`` if given, else ``seed mod classes`` (``class_labels=cycle``)."""
        classes = self.num_classes(model)
        if not classes:
            fail(f"guidance={self.name} needs class targets but the model / classifier has no classes")
        if labels is None:
            labels = torch.tensor([seed % classes for seed in seeds])
        labels = torch.as_tensor(labels).long().reshape(-1)
        if len(labels) != len(seeds):
            fail(f"guidance={self.name}: {len(labels)} class labels for {len(seeds)} samples")
        if bool(((labels < 0) | (labels >= classes)).any()):
            fail(f"guidance={self.name}: class labels must be in [0, {classes - 1}], got {labels.tolist()}")
        return labels.to(device)


def sigma_column(sigma: Tensor, x: Tensor) -> Tensor:
    """``sigma`` (scalar or (B,)) as a (B, 1, ...) tensor broadcasting against ``x``."""
    return append_dims(expand_sigma(sigma, x), x.ndim)
