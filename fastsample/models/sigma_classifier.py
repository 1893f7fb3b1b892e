"""A classifier seen in sigma space: ``classifier(x, sigma) -> logits``, the form guidance code calls.

Input convention (one place, used by training, guidance, metrics and exported classifier bundles):

* ``x = x0 + sigma * eps`` with ``x0`` in [-1, 1]: the same noisy state a sampler holds (EDM /
  k-diffusion convention, *not* the VP-scaled ``sqrt(abar) x0 + ...``). ``sigma`` is a float, a 0-d
  tensor or a ``(B,)`` tensor.
* ``kind="edm"`` (noise-conditioned guidance classifier, ``task.noisy=true``)::

      s = max(sigma, sigma_min)
      logits = net(x / sqrt(s**2 + sigma_data**2), log(s) / 4)

  i.e. EDM's ``c_in`` and ``c_noise``, so the raw network sees inputs of similar scale at every noise
  level. Clamping at ``sigma_min`` makes ``sigma=0`` (clean images) well defined.
* ``kind="clean"`` (``task.noisy=false``)::

      logits = net(x, noise_label)          # noise_label = 0.0, sigma is ignored (may be omitted)

  the convention of :class:`fastsample.metrics.features.ClassifierFeatures` (raw [-1, 1] pixels, constant
  noise label 0.0), so ``ClassifierFeatures(classifier)`` and ``ClassifierFeatures(classifier.net)`` agree.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from fastsample.diffusion.denoiser import append_dims, expand_sigma
from fastsample.utils.errors import check_choice, fail

INPUT_KINDS = ("edm", "clean")


def input_convention(
    noisy: bool, sigma_data: float = 0.5, sigma_min: float = 0.002, noise_label: float = 0.0
) -> dict[str, Any]:
    """The ``input`` record stored in classifier bundles (see the module docstring)."""
    if noisy:
        return {"kind": "edm", "sigma_data": float(sigma_data), "sigma_min": float(sigma_min)}
    return {"kind": "clean", "noise_label": float(noise_label)}


class SigmaClassifier(nn.Module):
    """``classifier(x, sigma) -> logits (B, num_classes)`` around a raw ``net(x, noise_labels)``.

    ``net`` is e.g. :class:`fastsample.models.classifier.NoisyClassifier` (anything with
    ``forward(x, noise_labels)`` and, for :meth:`features`, ``features(x, noise_labels)``).
    ``convention`` is an :func:`input_convention` record. Differentiable in ``x`` (classifier guidance).
    """

    def __init__(self, net: nn.Module, convention: dict[str, Any]) -> None:
        super().__init__()
        check_choice("classifier input kind", convention.get("kind"), INPUT_KINDS)
        self.net = net
        self.convention = dict(convention)
        self.noisy = convention["kind"] == "edm"
        self.num_classes = getattr(net, "num_classes", None)
        shape = getattr(net, "input_shape", None)
        self.image_shape = tuple(shape) if shape is not None else None

    def network_input(self, x: Tensor, sigma: Tensor | float | None) -> tuple[Tensor, Tensor | float]:
        """``(scaled x, noise labels)`` the raw network is called with."""
        if not self.noisy:
            return x, self.convention.get("noise_label", 0.0)
        if sigma is None:
            fail("this classifier is noise-conditioned (task.noisy=true): call it as classifier(x, sigma)")
        sigma = expand_sigma(sigma, x).clamp(min=self.convention["sigma_min"])
        c_in = 1 / (append_dims(sigma, x.ndim) ** 2 + self.convention["sigma_data"] ** 2).sqrt()
        return c_in * x, sigma.log() / 4

    def forward(self, x: Tensor, sigma: Tensor | float | None = None) -> Tensor:
        return self.net(*self.network_input(x, sigma))

    def features(self, x: Tensor, sigma: Tensor | float | None = None) -> Tensor:
        """The raw network's pooled penultimate features for ``x`` at noise level ``sigma``."""
        return self.net.features(*self.network_input(x, sigma))

    def log_prob(self, x: Tensor, sigma: Tensor | float | None, class_labels: Tensor) -> Tensor:
        """``log p(y | x_sigma)`` per row (B,), for classifier guidance (differentiate w.r.t. ``x``)."""
        log_probs = F.log_softmax(self.forward(x, sigma).float(), dim=-1)
        return log_probs.gather(1, class_labels.long().reshape(-1, 1).to(x.device)).squeeze(1)
