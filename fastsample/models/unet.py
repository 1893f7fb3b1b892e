"""A UNet backbone in the DDPM++ / ADM spirit, plus the building blocks the classifier reuses.

Structure: noise (and class) embedding -> :class:`UNetEncoder` (input conv, ``num_res_blocks``
residual blocks per level with optional self-attention, strided-conv downsampling, middle block)
-> :class:`UNetDecoder` (``num_res_blocks + 1`` blocks per level fed by the encoder's skips,
nearest + conv upsampling) -> GroupNorm, SiLU, zero-initialised output conv.

The network sees only ``noise_labels``: the preconditioning wrapper decides what they are
(``ln(sigma) / 4`` for EDM, a timestep 0..999 for DDPM), which is why the embeddings below work on
the raw value over both ranges.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastsample.utils.errors import check_choice, check_range, fail

EMBEDDINGS = ("positional", "fourier")


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= ``groups`` that divides ``channels``."""
    count = min(groups, channels)
    while channels % count:
        count -= 1
    return nn.GroupNorm(count, channels, eps=1e-6)


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters so each residual branch starts as the identity (ADM / DDPM++)."""
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


class PositionalEmbedding(nn.Module):
    """Transformer sinusoids of the raw value (DDPM++): frequencies ``max_positions ** -(i / half)``."""

    def __init__(self, num_channels: int, max_positions: int = 10000) -> None:
        super().__init__()
        half = num_channels // 2
        self.register_buffer("freqs", (1 / max_positions) ** (torch.arange(half) / half), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        angles = x.float()[:, None] * self.freqs[None, :]
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features (NCSN++): ``cos / sin(2 pi f x)`` with ``f ~ N(0, scale^2)``, fixed."""

    def __init__(self, num_channels: int, scale: float = 16.0) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        angles = x.float()[:, None] * (2 * math.pi * self.freqs[None, :])
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class NoiseEmbedding(nn.Module):
    """Noise-label embedding -> MLP, plus an optional learned class embedding (row ``num_classes`` = null).

    Labels equal to -1 or ``num_classes`` select the null embedding, as does ``class_labels=None``.
    In training mode each label is replaced by null with probability ``class_dropout``, which is
    what classifier-free guidance needs.
    """

    def __init__(
        self,
        model_channels: int,
        emb_channels: int,
        embedding: str = "positional",
        num_classes: int | None = None,
        class_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_choice("model.embedding", embedding, EMBEDDINGS)
        check_range("model.class_dropout", class_dropout, low=0.0, high=1.0)
        if num_classes is not None:
            check_range("model.num_classes", num_classes, low=1)
        embed = PositionalEmbedding if embedding == "positional" else FourierEmbedding
        self.noise = embed(model_channels)
        self.mlp = nn.Sequential(
            nn.Linear(model_channels, emb_channels), nn.SiLU(), nn.Linear(emb_channels, emb_channels)
        )
        self.num_classes, self.class_dropout = num_classes, class_dropout
        self.classes = nn.Embedding(num_classes + 1, emb_channels) if num_classes is not None else None

    def forward(self, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        features = self.noise(noise_labels)
        emb = self.mlp(features.to(self.mlp[0].weight.dtype))  # the model may run in half precision
        if self.classes is None:  # unconditional: labels are ignored (callers may pass them generically)
            return emb
        return emb + self.classes(self.class_index(class_labels, len(noise_labels), emb.device))

    def class_index(
        self, class_labels: torch.Tensor | None, batch: int, device: torch.device
    ) -> torch.Tensor:
        """Map labels to embedding rows: -1 / None -> null, training-mode dropout -> null."""
        null = self.num_classes
        if class_labels is None:
            return torch.full((batch,), null, dtype=torch.long, device=device)
        labels = class_labels.long().to(device).reshape(-1).expand(batch)
        if bool(((labels < -1) | (labels > null)).any()):
            fail(
                f"class labels must be in [-1, {null}] (-1 and {null} mean 'no class'); "
                f"got values in [{int(labels.min())}, {int(labels.max())}]"
            )
        labels = torch.where(labels < 0, torch.full_like(labels, null), labels)
        if self.training and self.class_dropout > 0:
            drop = torch.rand(batch, device=device) < self.class_dropout
            labels = torch.where(drop, torch.full_like(labels, null), labels)
        return labels


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the embedding as scale/shift (FiLM) on the second norm."""

    def __init__(
        self, in_channels: int, out_channels: int, emb_channels: int, dropout: float = 0.0, groups: int = 32
    ) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.affine = nn.Linear(emb_channels, 2 * out_channels)
        self.norm2 = group_norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.affine(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all pixels, as a residual branch."""

    def __init__(self, channels: int, num_heads: int = 1, groups: int = 32) -> None:
        super().__init__()
        if channels % num_heads:
            fail(
                f"model.num_heads={num_heads} does not divide the {channels} channels of an attention "
                f"block; use a divisor of {channels}"
            )
        self.num_heads = num_heads
        self.norm = group_norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        batch, channels, height, width = x.shape
        qkv = self.qkv(self.norm(x)).reshape(batch, 3, self.num_heads, channels // self.num_heads, -1)
        q, k, v = (t.transpose(-1, -2) for t in qkv.unbind(1))  # each (B, heads, HW, C/heads)
        out = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2)
        return x + self.proj(out.reshape(batch, channels, height, width))


class Downsample(nn.Module):
    """Halve the resolution with a strided 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour then a 3x3 convolution (avoids checkerboard artefacts)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class EmbSequential(nn.ModuleList):
    """Apply layers in order, handing each the embedding (layers that don't need it ignore it)."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb)
        return x


def feature_resolutions(image_size: int, channel_mult: Sequence[int]) -> list[int]:
    """Spatial size at each level, after validating that ``image_size`` halves cleanly."""
    levels = len(channel_mult)
    if levels < 1:
        fail("model.channel_mult is empty; give at least one level, e.g. [1, 2, 2]")
    check_range("model.image_size", image_size, low=1)
    factor = 2 ** (levels - 1)
    if image_size % factor:
        allowed = ", ".join(str(factor * k) for k in range(1, 5))
        fail(
            f"model.image_size={image_size} is not divisible by 2**(len(model.channel_mult)-1)={factor} "
            f"for channel_mult={list(channel_mult)}; use a multiple of {factor} ({allowed}, ...) "
            f"or fewer levels"
        )
    return [image_size // 2**level for level in range(levels)]


def check_input(x: torch.Tensor, expected: tuple[int, int, int]) -> None:
    """Fail unless ``x`` is a (B, C, H, W) batch with (C, H, W) == ``expected``."""
    if x.ndim != 4 or tuple(x.shape[1:]) != expected:
        got = tuple(x.shape[1:]) if x.ndim == 4 else tuple(x.shape)
        fail(
            f"model expects (C,H,W)={expected}, got {got}; check model.in_channels / model.image_size "
            f"against the data"
        )


def broadcast_labels(noise_labels: torch.Tensor | float, batch: int, device: torch.device) -> torch.Tensor:
    """Accept a (B,) tensor, a single-element tensor or a float and return a float (B,) tensor."""
    labels = torch.as_tensor(noise_labels, dtype=torch.float32, device=device).reshape(-1)
    if labels.numel() not in (1, batch):
        fail(
            f"noise_labels must have one value per batch item ({batch}) or a single value; "
            f"got {labels.numel()}"
        )
    return labels.expand(batch)


class UNetEncoder(nn.Module):
    """Input conv, the down path and the middle block; returns the middle features and the skips."""

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        model_channels: int,
        channel_mult: Sequence[int],
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        num_heads: int,
        dropout: float,
        emb_channels: int,
        groups: int,
        mid_attention: bool = True,
    ) -> None:
        super().__init__()
        resolutions = feature_resolutions(image_size, channel_mult)
        unknown = sorted(set(attention_resolutions) - set(resolutions))
        if unknown:
            fail(
                f"model.attention_resolutions={list(attention_resolutions)} contains {unknown}, not a "
                f"feature resolution of this network ({resolutions}); choose from those"
            )
        check_range("model.num_res_blocks", num_res_blocks, low=1)
        check_range("model.dropout", dropout, low=0.0, high=1.0, high_inclusive=False)

        # Kept for make_block, which the decoder uses too, so both halves build identical stages.
        self.emb_channels, self.dropout, self.groups = emb_channels, dropout, groups
        self.num_heads, self.attention_resolutions = num_heads, tuple(attention_resolutions)
        self.conv_in = nn.Conv2d(in_channels, model_channels, 3, padding=1)
        self.down = nn.ModuleList()
        self.skip_channels = [model_channels]
        channels = model_channels
        for level, (mult, resolution) in enumerate(zip(channel_mult, resolutions)):
            for _ in range(num_res_blocks):
                self.down.append(self.make_block(channels, model_channels * mult, resolution))
                channels = model_channels * mult
                self.skip_channels.append(channels)
            if level < len(channel_mult) - 1:
                self.down.append(EmbSequential([Downsample(channels)]))
                self.skip_channels.append(channels)
        middle = [ResBlock(channels, channels, emb_channels, dropout, groups)]
        if mid_attention:
            middle.append(AttentionBlock(channels, num_heads, groups))
        middle.append(ResBlock(channels, channels, emb_channels, dropout, groups))
        self.middle = EmbSequential(middle)
        self.out_channels = channels

    def make_block(self, in_channels: int, out_channels: int, resolution: int) -> EmbSequential:
        """A residual block, followed by self-attention when ``resolution`` is an attention resolution."""
        layers: list[nn.Module] = [
            ResBlock(in_channels, out_channels, self.emb_channels, self.dropout, self.groups)
        ]
        if resolution in self.attention_resolutions:
            layers.append(AttentionBlock(out_channels, self.num_heads, self.groups))
        return EmbSequential(layers)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        h = self.conv_in(x)
        skips = [h]
        for stage in self.down:
            h = stage(h, emb)
            skips.append(h)
        return self.middle(h, emb), skips


class UNetDecoder(nn.Module):
    """The up path: ``num_res_blocks + 1`` blocks per level, each consuming one encoder skip."""

    def __init__(
        self,
        encoder: UNetEncoder,
        model_channels: int,
        channel_mult: Sequence[int],
        num_res_blocks: int,
        resolutions: Sequence[int],
    ) -> None:
        super().__init__()
        skips = list(encoder.skip_channels)
        channels = encoder.out_channels
        self.up = nn.ModuleList()
        for level in reversed(range(len(channel_mult))):
            for index in range(num_res_blocks + 1):
                width = model_channels * channel_mult[level]
                stage = encoder.make_block(channels + skips.pop(), width, resolutions[level])
                channels = width
                if level > 0 and index == num_res_blocks:
                    stage.append(Upsample(channels))
                self.up.append(stage)
        self.out_channels = channels

    def forward(self, h: torch.Tensor, skips: list[torch.Tensor], emb: torch.Tensor) -> torch.Tensor:
        skips = list(skips)
        for stage in self.up:
            h = stage(torch.cat([h, skips.pop()], dim=1), emb)
        return h


class UNet(nn.Module):
    """Noise- (and optionally class-) conditioned UNet: ``(x, noise_labels, class_labels) -> (B, out, H, W)``.

    ``num_classes`` enables class conditioning with a null label (index ``num_classes``, or -1, or
    ``class_labels=None``) for classifier-free guidance; an unconditional model ignores labels.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        image_size: int = 32,
        model_channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (16,),
        num_heads: int = 1,
        dropout: float = 0.0,
        embedding: str = "positional",
        num_classes: int | None = None,
        class_dropout: float = 0.0,
        groups: int = 32,
        mid_attention: bool = True,
    ) -> None:
        super().__init__()
        check_range("model.in_channels", in_channels, low=1)
        check_range("model.model_channels", model_channels, low=1)
        channel_mult, attention_resolutions = tuple(channel_mult), tuple(attention_resolutions)
        self.in_channels, self.image_size = in_channels, image_size
        self.out_channels = out_channels or in_channels
        self.num_classes = num_classes
        emb_channels = 4 * model_channels
        self.embed = NoiseEmbedding(model_channels, emb_channels, embedding, num_classes, class_dropout)
        self.encoder = UNetEncoder(
            in_channels,
            image_size,
            model_channels,
            channel_mult,
            num_res_blocks,
            attention_resolutions,
            num_heads,
            dropout,
            emb_channels,
            groups,
            mid_attention,
        )
        self.decoder = UNetDecoder(
            self.encoder,
            model_channels,
            channel_mult,
            num_res_blocks,
            feature_resolutions(image_size, channel_mult),
        )
        self.norm_out = group_norm(self.decoder.out_channels, groups)
        self.conv_out = zero_init(nn.Conv2d(self.decoder.out_channels, self.out_channels, 3, padding=1))

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) the network accepts."""
        return (self.in_channels, self.image_size, self.image_size)

    def forward(
        self, x: torch.Tensor, noise_labels: torch.Tensor | float, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Predict a (B, out_channels, H, W) tensor from ``x`` at noise level ``noise_labels``."""
        check_input(x, self.input_shape)
        emb = self.embed(broadcast_labels(noise_labels, len(x), x.device), class_labels)
        h, skips = self.encoder(x, emb)
        h = self.decoder(h, skips, emb)
        return self.conv_out(F.silu(self.norm_out(h)))
