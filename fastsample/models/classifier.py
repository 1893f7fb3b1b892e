"""A noise-conditioned image classifier: the UNet's encoder half plus a pooled linear head.

Used as the guidance classifier ``log p(y | x_sigma)`` (trained on noisy images, ADM-style) and, with
a constant ``noise_labels``, as a clean-image domain classifier whose pooled features serve as an
embedding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastsample.models.unet import NoiseEmbedding, UNetEncoder, broadcast_labels, check_input, group_norm
from fastsample.utils.errors import check_range


class NoisyClassifier(nn.Module):
    """``(x, noise_labels) -> logits (B, num_classes)``, built from :class:`UNetEncoder`."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: int = 32,
        model_channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (16,),
        num_heads: int = 1,
        dropout: float = 0.0,
        embedding: str = "positional",
        groups: int = 32,
        mid_attention: bool = True,
    ) -> None:
        super().__init__()
        check_range("model.num_classes", num_classes, low=1)
        check_range("model.in_channels", in_channels, low=1)
        self.in_channels, self.image_size, self.num_classes = in_channels, image_size, num_classes
        emb_channels = 4 * model_channels
        self.embed = NoiseEmbedding(model_channels, emb_channels, embedding)
        self.encoder = UNetEncoder(
            in_channels,
            image_size,
            model_channels,
            tuple(channel_mult),
            num_res_blocks,
            tuple(attention_resolutions),
            num_heads,
            dropout,
            emb_channels,
            groups,
            mid_attention,
        )
        self.feature_dim = self.encoder.out_channels
        self.norm_out = group_norm(self.feature_dim, groups)
        self.head = nn.Linear(self.feature_dim, num_classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) the network accepts."""
        return (self.in_channels, self.image_size, self.image_size)

    def features(self, x: torch.Tensor, noise_labels: torch.Tensor | float = 0.0) -> torch.Tensor:
        """Pooled penultimate features (B, :attr:`feature_dim`) of ``x`` at noise level ``noise_labels``."""
        check_input(x, self.input_shape)
        emb = self.embed(broadcast_labels(noise_labels, len(x), x.device))
        h, _ = self.encoder(x, emb)
        return F.silu(self.norm_out(h)).mean(dim=(2, 3))

    def features_and_logits(
        self, x: torch.Tensor, noise_labels: torch.Tensor | float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`features` and the logits computed from them: one encoder pass instead of two."""
        features = self.features(x, noise_labels)
        return features, self.head(features)

    def forward(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor | float = 0.0,
        class_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, num_classes). ``class_labels`` is accepted for a UNet-like signature and ignored."""
        return self.head(self.features(x, noise_labels))
