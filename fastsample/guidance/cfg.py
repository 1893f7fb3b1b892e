"""Classifier-free guidance: ``D_w = D_uncond + w (D_cond - D_uncond)``, one batched model call.

The conditional and the unconditional (null label) passes of the same network are stacked into one
batch of ``2B`` rows, so a guided step costs one network call of twice the batch (the same result as
two separate passes; ``tests/test_guidance.py`` checks this). ``w = 1`` is the conditional model,
``w = 0`` the unconditional one, ``w > 1`` extrapolates (Ho & Salimans' ``1 + w`` convention is this
``w`` minus one).

CFG changes the denoiser, it adds no term to the ODE: splitting samplers, which integrate a
conditional function apart from the diffusion part, refuse it (use a plain sampler).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fastsample.diffusion.denoiser import WrappedDenoiser
from fastsample.guidance.base import GuidanceBatch, GuidanceTask, GuidedRun
from fastsample.utils.errors import fail


class CFGDenoiser(WrappedDenoiser):
    """``D_uncond + scale * (D_cond - D_uncond)`` with both passes in one batched call.

    ``class_labels`` come with each call (the sampler's ``cond``). The null label is ``num_classes``
    (the convention of the UNet and the analytic mixture here; both also read -1 as null).
    """

    def __init__(self, inner: Any, scale: float, null_label: int | None = None) -> None:
        super().__init__(inner)
        self.scale = float(scale)
        self.null_label = int(null_label if null_label is not None else getattr(inner, "num_classes", -1))

    def forward(
        self, x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None, **cond: Any
    ) -> Tensor:
        if class_labels is None:
            fail("classifier-free guidance needs class labels (class_labels=cycle or a class index)")
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma.reshape(x.shape[0])
        labels = class_labels.long().to(x.device).reshape(-1).expand(x.shape[0])
        null = torch.full_like(labels, self.null_label)
        both = self.inner(
            torch.cat([x, x]), torch.cat([sigma, sigma]), class_labels=torch.cat([labels, null]), **cond
        )
        conditional, unconditional = both.chunk(2)
        return unconditional + self.scale * (conditional - unconditional)


class ClassifierFreeGuidance(GuidanceTask):
    """Classifier-free guidance of a class-conditional model (trained with label dropout).

    Args:
        scale: ``w >= 0`` in ``D_uncond + w (D_cond - D_uncond)``; 1 is the conditional model.
    """

    name = "cfg"
    kind = "wrapper"
    needs_labels = True

    def __init__(self, scale: float = 2.0) -> None:
        super().__init__(scale)

    def prepare(self, model: Any, batch: GuidanceBatch) -> None:
        if not getattr(model, "num_classes", None):
            fail(
                "guidance=cfg needs a class-conditional model (trained with class labels and label "
                "dropout); this model has no classes"
            )

    def guided_run(self, model: Any, labels: Tensor | None, batch: GuidanceBatch) -> GuidedRun:
        return GuidedRun(CFGDenoiser(model, self.scale), {"class_labels": labels})
