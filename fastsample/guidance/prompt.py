"""Text prompts with classifier-free guidance, for text-conditional models (``model=diffusers_t2i``).

``guidance=prompt guidance.prompts=[...]`` gives sample ``k`` the prompt ``prompts[seed mod P]``
(``class_labels=cycle``; a fixed ``class_labels=i`` gives every sample prompt ``i``), so the prompt
index is stored as the sample's label. The denoiser is wrapped as in
:mod:`fastsample.guidance.cfg`: ``D_neg + scale (D_prompt - D_neg)`` with the conditional and the
negative-prompt passes stacked into one batched call; ``scale`` follows diffusers' ``guidance_scale``
(1: the prompt alone, no second pass). Any sampler runs on the result; NFE is the sampler's.

The model supplies ``encode_prompts(list[str]) -> (P, tokens, width)`` embeddings and takes them as
the condition ``encoder_hidden_states`` (see
:class:`fastsample.models.diffusers_adapter.TextToImageDenoiser`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from fastsample.diffusion.denoiser import WrappedDenoiser, expand_sigma
from fastsample.guidance.base import GuidanceBatch, GuidanceTask, GuidedRun
from fastsample.utils.errors import fail


def _find(model: Any, name: str) -> Any:
    """``model.name`` through wrappers (``.inner``), or None."""
    while model is not None:
        try:
            return getattr(model, name)
        except AttributeError:
            model = getattr(model, "inner", None)
    return None


class PromptCFGDenoiser(WrappedDenoiser):
    """``D_neg + scale (D_prompt - D_neg)`` on text embeddings, both passes in one batched call."""

    def __init__(self, inner: Any, scale: float) -> None:
        super().__init__(inner)
        self.scale = float(scale)

    def forward(
        self,
        x: Tensor,
        sigma: Tensor | float,
        encoder_hidden_states: Tensor | None = None,
        negative_encoder_hidden_states: Tensor | None = None,
        **cond: Any,
    ) -> Tensor:
        if encoder_hidden_states is None:
            fail("guidance=prompt: the condition has no prompt embeddings (encoder_hidden_states)")
        if self.scale == 1 or negative_encoder_hidden_states is None:
            return self.inner(x, sigma, encoder_hidden_states=encoder_hidden_states, **cond)
        sigma = expand_sigma(sigma, x)
        both = self.inner(
            torch.cat([x, x]),
            torch.cat([sigma, sigma]),
            encoder_hidden_states=torch.cat([encoder_hidden_states, negative_encoder_hidden_states]),
            **cond,
        )
        conditional, negative = both.chunk(2)
        return negative + self.scale * (conditional - negative)


class PromptGuidance(GuidanceTask):
    """Prompts for a text-conditional model, with classifier-free guidance.

    Args:
        prompts: one prompt or a list; sample ``k`` gets ``prompts[label]`` (label: seed mod P by default).
        scale: the guidance scale (diffusers' ``guidance_scale``): 1 is the prompt alone, 7.5 SD's default.
        negative_prompt: the prompt guided away from ("" is the unconditional model).
    """

    name = "prompt"
    kind = "wrapper"
    needs_labels = True

    def __init__(self, prompts: Sequence[str] | str, scale: float = 7.5, negative_prompt: str = "") -> None:
        super().__init__(scale)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts or [])
        if not prompts or not all(isinstance(prompt, str) for prompt in prompts):
            fail(f"guidance.prompts must be a non-empty list of strings, got {prompts!r}")
        if not isinstance(negative_prompt, str):
            fail(f"guidance.negative_prompt must be a string, got {negative_prompt!r}")
        self.prompts, self.negative_prompt = prompts, negative_prompt

    def num_classes(self, model: Any) -> int:
        """Labels index the prompts."""
        return len(self.prompts)

    def prepare(self, model: Any, batch: GuidanceBatch) -> None:
        if _find(model, "encode_prompts") is None:
            fail(
                "guidance=prompt needs a text-conditional model (e.g. model=diffusers_t2i); "
                "this model has no text encoder"
            )

    def guided_run(self, model: Any, labels: Tensor | None, batch: GuidanceBatch) -> GuidedRun:
        encode = _find(model, "encode_prompts")
        embeddings = encode(self.prompts).to(batch.device)
        cond = {"encoder_hidden_states": embeddings[labels]}
        if self.scale != 1:
            negative = encode([self.negative_prompt]).to(batch.device)
            cond["negative_encoder_hidden_states"] = negative.expand(len(batch.seeds), -1, -1)
        return GuidedRun(PromptCFGDenoiser(model, self.scale), cond)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "prompts": list(self.prompts), "negative_prompt": self.negative_prompt}
