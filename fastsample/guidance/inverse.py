"""Inverse problems: sample ``x0`` given a measurement ``y = A(x0) (+ noise)``.

Two mechanisms, usable together:

* data consistency, a conditional function on the denoised estimate (DPS-style, through autograd of
  the denoiser): ``g(x, sigma) = s * grad_x ||y - A(D(x, sigma))||^2``. ``dx/dsigma`` gets ``+g`` and
  sigma decreases, so the state moves down the gradient of the residual. Each evaluation costs one
  denoiser forward + backward (counted as ``guidance_model_calls``).
* projection (``projection=true``): the denoised estimate is replaced by its projection onto the
  measurements, ``D' = D + A^+ (y - A D)`` (for inpainting: the known pixels of ``D`` become ``y``),
  and the data-consistency term is restricted to the unmeasured part, ``g - A^+ A g`` (``A^+ A`` is
  an orthogonal projector for the three operators here). The measured part ``A x`` then follows
  ``d(Ax)/dsigma = (Ax - y) / sigma``, a straight line to ``y``, which every ODE solver here
  (plain or splitting) integrates exactly: the samples satisfy ``A x = y`` to rounding.

Where ``y`` comes from (``source``) when sampling by seed: ``dataset`` (image ``seed mod N`` of
``data``'s ``split``), ``model`` (an exact sample of an analytic mixture, seeded by the seed), or
``auto`` (``model`` for analytic mixtures, else ``dataset``). Library users pass ``y`` directly
to :meth:`InverseProblem.for_measurement`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from fastsample.diffusion.denoiser import WrappedDenoiser
from fastsample.guidance.base import (
    ConditionalFunction,
    GuidanceBatch,
    GuidanceStats,
    GuidanceTask,
    GuidedRun,
)
from fastsample.guidance.operators import (
    LUMA,
    DownsampleOperator,
    GrayscaleOperator,
    LinearOperator,
    MaskOperator,
)
from fastsample.utils.errors import check_choice, check_range, fail

SOURCES = ("auto", "dataset", "model")
#: offsets the measurement streams from the sampling noise of the same seed
MEASUREMENT_SEED_OFFSET = 1_000_003


class DataConsistency(ConditionalFunction):
    """``g(x, sigma) = scale * grad_x ||y - A(D(x, sigma))||^2`` (per sample, summed over pixels)."""

    def __init__(
        self,
        denoiser: Any,
        operator: LinearOperator,
        measurement: Tensor,
        scale: float,
        cond: dict[str, Any] | None = None,
        stats: GuidanceStats | None = None,
        unmeasured_only: bool = False,
    ) -> None:
        super().__init__(scale, stats)
        self.denoiser, self.operator, self.measurement = denoiser, operator, measurement
        self.cond = cond or {}
        self.unmeasured_only = unmeasured_only

    def field(self, x: Tensor, sigma: Tensor) -> Tensor:
        x = x.requires_grad_(True)
        self.stats.model_calls += 1
        denoised = self.denoiser(x, sigma * x.new_ones(x.shape[0]), **self.cond)
        residual = self.measurement.to(denoised) - self.operator(denoised)
        (grad,) = torch.autograd.grad(residual.pow(2).sum(), x)
        if self.unmeasured_only:  # leave the measured part A x to the projection: A(grad - A^+ A grad) = 0
            grad = grad - self.operator.pinv(self.operator(grad))
        return self.scale * grad


class ProjectedDenoiser(WrappedDenoiser):
    """``D' = D + A^+ (y - A D)``: the denoised estimate projected onto ``{A x = y}``."""

    def __init__(self, inner: Any, operator: LinearOperator, measurement: Tensor) -> None:
        super().__init__(inner)
        self.operator = operator
        self.measurement = measurement

    def forward(self, x: Tensor, sigma: Tensor | float, **cond: Any) -> Tensor:
        denoised = self.inner(x, sigma, **cond)
        return self.operator.project(denoised, self.measurement.to(denoised))


class InverseProblem(GuidanceTask):
    """Data consistency (and optional projection) for a measurement operator ``A``.

    Args:
        operator: the :class:`~fastsample.guidance.operators.LinearOperator`.
        scale: data-consistency scale ``s >= 0`` (0: projection only, or no guidance).
        projection: replace the measured part of the denoised estimate (see the module docstring).
        source: where measurements come from when sampling by seed: auto | dataset | model.
        data: a DataModule (anything with ``dataset(split)``) for ``source=dataset``.
        split: its split (``test`` by default: unseen images).
        noise_std: std of Gaussian noise added to ``A(x0)`` (seeded per sample).
    """

    name = "inverse"

    def __init__(
        self,
        operator: LinearOperator,
        scale: float = 1.0,
        projection: bool = False,
        source: str = "auto",
        data: Any = None,
        split: str = "test",
        noise_std: float = 0.0,
    ) -> None:
        super().__init__(scale)
        check_choice("guidance.source", source, SOURCES)
        check_range("guidance.noise_std", noise_std, low=0)
        self.operator = operator
        self.projection = bool(projection)
        self.source, self.data, self.split = source, data, split
        self.noise_std = float(noise_std)

    # -- measurements ------------------------------------------------------------------------------
    def ground_truth(
        self, model: Any, seeds: list[int], shape: Sequence[int], device: Any, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor | None]:
        """The clean images (and their labels, if any) the measurements of ``seeds`` are taken from."""
        source = self.source
        if source == "auto":
            source = (
                "model"
                if callable(getattr(model, "sample", None)) and hasattr(model, "log_prob")
                else "dataset"
            )
        if source == "model":
            if not (callable(getattr(model, "sample", None)) and hasattr(model, "log_prob")):
                fail(
                    f"guidance.source=model draws ground truth from an analytic mixture; "
                    f"{type(model).__name__} is not one: use guidance.source=dataset"
                )
            rows = [
                model.sample(1, generator=torch.Generator().manual_seed(MEASUREMENT_SEED_OFFSET + seed))
                for seed in seeds
            ]
            images = torch.cat([image for image, _ in rows])
            labels = torch.cat([label for _, label in rows])
        else:
            if self.data is None or not callable(getattr(self.data, "dataset", None)):
                fail(
                    "guidance.source=dataset needs guidance.data (a DataModule, by default the "
                    "`dataset` config group)"
                )
            dataset = self.data.dataset(self.split)
            if len(dataset) == 0:
                fail(f"guidance.data {self.split} split is empty; no measurements to take")
            items = [dataset[seed % len(dataset)] for seed in seeds]
            images = torch.stack([torch.as_tensor(image) for image, _ in items])
            labels = torch.stack([torch.as_tensor(label) for _, label in items]).long()
        if tuple(images.shape[1:]) != tuple(shape):
            fail(
                f"guidance.source={source} gives images of shape {tuple(images.shape[1:])} but the model "
                f"makes {tuple(shape)}; pick a dataset matching the model (dataset=...)"
            )
        return images.to(device=device, dtype=dtype), labels

    def measure(self, x0: Tensor, seeds: list[int] | None = None) -> Tensor:
        """``A(x0)`` plus, with ``noise_std > 0``, Gaussian noise seeded per sample."""
        y = self.operator(x0)
        if self.noise_std > 0:
            seeds = list(range(len(x0))) if seeds is None else seeds
            noise = torch.stack(
                [
                    torch.randn(
                        y.shape[1:], generator=torch.Generator().manual_seed(2 * MEASUREMENT_SEED_OFFSET + s)
                    )
                    for s in seeds
                ]
            )
            y = y + self.noise_std * noise.to(y)
        return y

    # -- the guided problem ------------------------------------------------------------------------
    def for_measurement(
        self,
        model: Any,
        measurement: Tensor,
        *,
        cond: dict[str, Any] | None = None,
        shape: Sequence[int] | None = None,
        reference: Tensor | None = None,
    ) -> GuidedRun:
        """The guided problem for given measurements ``y`` (one row per sample)."""
        shape = tuple(shape) if shape is not None else getattr(model, "image_shape", None)
        if shape is None:
            fail("the model does not declare its data shape; pass shape=(C, H, W)")
        self.operator.check_measurement(measurement, shape)
        denoiser = ProjectedDenoiser(model, self.operator, measurement) if self.projection else model
        # On the raw model (the projected estimate has no residual), acting on the unmeasured part.
        guidance = DataConsistency(
            model, self.operator, measurement, self.scale, cond, self.stats, unmeasured_only=self.projection
        )
        return GuidedRun(denoiser, cond, guidance, measurement=measurement, reference=reference)

    def prepare(self, model: Any, batch: GuidanceBatch) -> None:
        if batch.shape is None:
            fail("the model does not declare its data shape; set shape=[C,H,W]")
        self.operator.check_data(batch.shape)

    def guided_run(self, model: Any, labels: Tensor | None, batch: GuidanceBatch) -> GuidedRun:
        """Measurements of ground truth chosen by seed (``source``); ``labels`` condition the model."""
        x0, _ = self.ground_truth(model, batch.seeds, batch.shape, batch.device, batch.dtype)
        cond = {"class_labels": labels.to(batch.device)} if labels is not None else None
        measurement = self.measure(x0, batch.seeds)
        return self.for_measurement(model, measurement, cond=cond, shape=batch.shape, reference=x0)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            **self.operator.describe(),
            "projection": self.projection,
            "source": self.source,
            "noise_std": self.noise_std,
        }


class Inpainting(InverseProblem):
    """Inpainting: ``mask`` (name of a missing region, or a 0/1 array / file; 1 = observed)."""

    name = "inpaint"

    def __init__(
        self, mask: Any = "center", mask_size: float = 0.5, mask_seed: int = 0, **settings: Any
    ) -> None:
        super().__init__(MaskOperator(mask, mask_size, mask_seed), **settings)


class Colorization(InverseProblem):
    """Colorization: the measurement is the grayscale (luma) image of an RGB sample."""

    name = "colorize"

    def __init__(self, weights: Sequence[float] = LUMA, **settings: Any) -> None:
        super().__init__(GrayscaleOperator(weights), **settings)


class SuperResolution(InverseProblem):
    """Super-resolution: the measurement is the ``factor``-times average-pooled image."""

    name = "superres"

    def __init__(self, factor: int = 2, **settings: Any) -> None:
        super().__init__(DownsampleOperator(factor), **settings)
