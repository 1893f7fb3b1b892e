"""Classifier guidance: ``g = -s * sigma * grad_x log p(c | x, sigma)``.

In sigma space (``x = x0 + sigma * eps``) the guided denoiser is ``D - sigma * g = D + s sigma^2
grad log p(c | x)``: Tweedie's formula for the tilted density ``p(x) p(c | x)^s``; with the exact
posterior and ``s = 1`` it is exactly the class-conditional denoiser (the tests check this on the
analytic mixture). ADM's ``eps_hat = eps - s sqrt(1 - abar) grad log p`` is the same rule.

Two sources of ``log p(c | x, sigma)``:

* :class:`ClassifierGuidance`: a noise-conditioned classifier (``train.py task=classifier
  task.noisy=true``, the shipped ``fmnist_guidance_classifier.pt``), called through the
  :class:`~fastsample.models.sigma_classifier.SigmaClassifier` convention ``classifier(x, sigma)``;
* :class:`MixturePosteriorGuidance`: the exact class posterior of an analytic
  :class:`~fastsample.models.gmm.GaussianMixture` (a test oracle: no classifier error at all).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fastsample.guidance.base import (
    ConditionalFunction,
    GuidanceBatch,
    GuidanceStats,
    GuidanceTask,
    GuidedRun,
    sigma_column,
)
from fastsample.models import bundle
from fastsample.utils.errors import fail

#: log p(c | x, sigma) per row for target labels: (x, sigma, labels) -> (B,)
LogProbFn = Callable[[Tensor, Tensor, Tensor], Tensor]


class LogProbGuidance(ConditionalFunction):
    """``g(x, sigma) = -scale * sigma * grad_x log_prob(x, sigma, labels)`` for fixed target labels."""

    def __init__(
        self, log_prob: LogProbFn, labels: Tensor, scale: float, stats: GuidanceStats | None = None
    ) -> None:
        super().__init__(scale, stats)
        self.log_prob = log_prob
        self.labels = labels

    def field(self, x: Tensor, sigma: Tensor) -> Tensor:
        x = x.requires_grad_(True)
        total = self.log_prob(x, sigma, self.labels).sum()
        (grad,) = torch.autograd.grad(total, x)
        return -self.scale * sigma_column(sigma, x) * grad.to(x.dtype)


def load_guidance_classifier(classifier: Any, loader: Callable[[Any], Any] | None = None) -> Any:
    """A classifier module as is, or a file: an existing path, else the name of a shipped asset.

    ``loader`` reads files when given (conf/guidance/classifier.yaml passes
    :func:`fastsample.lit.loading.guidance_classifier`, which also reads Lightning ``.ckpt`` files);
    without it files are read as bundles (the guidance layer knows no Lightning).
    """
    if not isinstance(classifier, (str, os.PathLike)):
        return classifier
    if loader is not None:
        return loader(classifier)
    path = Path(classifier)
    if path.is_file() or os.sep in str(classifier):
        return bundle.load_classifier(path, setting="guidance.classifier")
    return bundle.load_asset(str(classifier))


class ClassifierGuidance(GuidanceTask):
    """Classifier guidance with a noise-conditioned classifier ``classifier(x, sigma) -> logits``.

    Args:
        classifier: a :class:`~fastsample.models.sigma_classifier.SigmaClassifier` (or any module with
            that call convention), a classifier bundle path (``.ckpt`` too, with ``loader``), or a
            shipped asset name.
        scale: the guidance scale ``s >= 0`` (0: no guidance).
        model_labels: also pass the target labels to a class-conditional diffusion model (ADM's
            conditional + classifier setting); by default the model runs unconditionally.
        loader: reads a file or asset ``classifier`` (see :func:`load_guidance_classifier`).
    """

    name = "classifier"
    needs_labels = True

    def __init__(
        self,
        classifier: Any,
        scale: float = 1.0,
        model_labels: bool = False,
        loader: Callable[[Any], Any] | None = None,
    ) -> None:
        super().__init__(scale)
        self.classifier = load_guidance_classifier(classifier, loader)
        if not callable(self.classifier):
            fail(f"guidance.classifier must be a classifier module or file, got {type(classifier).__name__}")
        if isinstance(self.classifier, torch.nn.Module):
            self.classifier.eval().requires_grad_(False)
        self.model_labels = bool(model_labels)
        self.source = (
            str(classifier) if isinstance(classifier, (str, os.PathLike)) else type(classifier).__name__
        )

    def num_classes(self, model: Any) -> int | None:
        return getattr(self.classifier, "num_classes", None) or getattr(model, "num_classes", None)

    def log_prob(self, x: Tensor, sigma: Tensor, labels: Tensor) -> Tensor:
        if hasattr(self.classifier, "log_prob"):
            return self.classifier.log_prob(x, sigma, labels)
        logits = self.classifier(x, sigma)
        if logits.dtype in (torch.float16, torch.bfloat16):  # softmax in at least single precision
            logits = logits.float()
        return logits.log_softmax(dim=-1).gather(1, labels.long().reshape(-1, 1)).squeeze(1)

    def prepare(self, model: Any, batch: GuidanceBatch) -> None:
        expected = getattr(self.classifier, "image_shape", None)
        if expected is not None and batch.shape is not None and tuple(expected) != batch.shape:
            fail(
                f"guidance.classifier takes images of shape {tuple(expected)} but the model makes "
                f"{batch.shape}; use a classifier trained on the model's data"
            )
        if isinstance(self.classifier, torch.nn.Module):
            self.classifier.to(batch.device)

    def guided_run(self, model: Any, labels: Tensor | None, batch: GuidanceBatch) -> GuidedRun:
        cond = {"class_labels": labels} if self.model_labels else None
        return GuidedRun(model, cond, LogProbGuidance(self.log_prob, labels, self.scale, self.stats))

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "classifier": self.source, "model_labels": self.model_labels}


class MixturePosteriorGuidance(GuidanceTask):
    """Classifier guidance with the exact class posterior of an analytic Gaussian mixture model.

    The model itself must be the mixture (``model=gmm_*``); it runs unconditionally and
    ``log p(c | x, sigma)`` comes from :meth:`GaussianMixture.class_log_posterior`.
    """

    name = "gmm_posterior"
    needs_labels = True

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__(scale)

    def guided_run(self, model: Any, labels: Tensor | None, batch: GuidanceBatch) -> GuidedRun:
        return GuidedRun(model, None, self.function(model, labels))

    def function(self, model: Any, labels: Tensor) -> LogProbGuidance:
        """The conditional function for ``labels`` (exact posterior of ``model``)."""
        posterior = getattr(model, "class_log_posterior", None)
        if posterior is None:
            fail(
                f"guidance=gmm_posterior needs an analytic mixture model (model=gmm_fmnist, gmm_digits, "
                f"gmm_toy); {type(model).__name__} has no exact class posterior. Use guidance=classifier"
            )

        def log_prob(x: Tensor, sigma: Tensor, targets: Tensor) -> Tensor:
            log_posterior = posterior(x, sigma)
            return log_posterior.gather(1, targets.reshape(-1, 1).to(log_posterior.device)).squeeze(1)

        return LogProbGuidance(log_prob, labels, self.scale, self.stats)
