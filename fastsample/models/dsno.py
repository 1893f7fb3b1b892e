"""DSNO's operator (Zheng et al., ICML 2023): initial noise -> the whole ODE trajectory in one forward pass.

:class:`DSNOOperator` turns a copy of the project's UNet (plain, or inside a
:class:`~fastsample.models.patch.Patchify`) into a network on ``(B, M, C, H, W)``:

- the backbone runs once on the ``B * M`` frames, every frame fed the same start state ``x_T`` and the
  noise label of *its own output time* through the backbone's existing embedding (the per-output-time
  embedding; EDM labels ``ln(sigma) / 4``, sigma clamped to the teacher's ``sigma_min`` for the final
  frame at sigma = 0);
- after every residual and attention block a temporal layer ``h + act(SpectralTimeConv(h))`` mixes the
  M frames: an FFT over the time axis, a learned complex ``C x C`` weight for each of the lowest
  ``modes`` frequencies, the inverse FFT. Its weights start at zero, so at initialization every frame
  is exactly the backbone's output for that frame's label;
- frame ``m``'s raw output ``F_m`` gives a data estimate with the EDM preconditioning of the *input*
  level ``sigma_0`` (the input is ``x_T`` for every frame), and the state at ``sigma_m`` is DDIM's jump
  from ``x_T`` with that estimate:
  ``x0_m = c_skip(s_0) x_T + c_out(s_0) F_m``, ``x_m = x0_m + (s_m / s_0) (x_T - x0_m)``.
  Any target state is reachable this way; the last frame (``s_M = 0``) is the sample itself.

The knowledge-distillation baseline (Luhman & Luhman 2021) is the same class without temporal layers
and with the single output time ``sigma = 0``.

Bundles (:func:`export_operator` / :func:`load_operator`) hold the backbone's network config, the
operator's settings, its output levels, the teacher's identity and the (EMA) weights. The training
loss on teacher trajectories (:func:`dsno_loss` with :func:`point_weights`) is plain code here too;
``fastsample.lit.dsno`` drives it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fastsample.models.unet import AttentionBlock, NoiseEmbedding, ResBlock
from fastsample.utils.errors import UserError, check_choice, check_range, fail
from fastsample.utils.instantiation import instantiate
from fastsample.utils.io import save_torch_atomic

OPERATOR_FORMAT = "fastsample-dsno-v1"
ACTIVATIONS = ("leaky_relu", "gelu", "silu", "identity")
MODES = ("dsno", "kd")
TIME_EMBEDDINGS = ("output", "start")
LOSSES = ("l2", "l1")
WEIGHTINGS = ("alpha_sigma", "uniform", "final")


class SpectralTimeConv(nn.Module):
    """Convolution over the time axis of ``(B, M, C, ...)`` parameterized in Fourier space.

    ``rfft`` over M, the lowest ``modes`` frequencies each multiplied by its own complex ``C x C``
    matrix (higher ones dropped), ``irfft`` back to M frames. It is linear and commutes with circular
    shifts of the time axis (a circular convolution); zero weights give zero.
    """

    def __init__(self, channels: int, modes: int, init_scale: float = 0.0) -> None:
        super().__init__()
        check_range("task.modes", modes, low=1)
        self.channels, self.modes = channels, modes
        weight = torch.zeros(modes, channels, channels, 2)
        if init_scale:
            weight.normal_(0.0, init_scale / channels)
        self.weight = nn.Parameter(weight)

    def forward(self, x: Tensor) -> Tensor:
        frames = x.shape[1]
        kept = frames // 2 + 1
        if self.modes > kept:
            fail(
                f"task.modes={self.modes} exceeds the {kept} frequencies of M={frames} frames; "
                f"use task.modes <= M // 2 + 1 = {kept}"
            )
        spectrum = torch.fft.rfft(x.float(), dim=1)  # (B, kept, C, ...)
        weight = torch.view_as_complex(self.weight.float().contiguous())  # (modes, C_in, C_out)
        mixed = torch.einsum("bmi...,mio->bmo...", spectrum[:, : self.modes], weight)
        out = torch.zeros_like(spectrum)
        out[:, : self.modes] = mixed
        return torch.fft.irfft(out, n=frames, dim=1).to(x.dtype)


def activation(name: str) -> nn.Module:
    """The temporal layer's nonlinearity by name (the paper: LeakyReLU)."""
    check_choice("task.activation", name, ACTIVATIONS)
    return {
        "leaky_relu": nn.LeakyReLU(0.01),
        "gelu": nn.GELU(),
        "silu": nn.SiLU(),
        "identity": nn.Identity(),
    }[name]


class TemporalLayer(nn.Module):
    """``x + act(SpectralTimeConv(x))`` on ``(B, M, C, H, W)``: the identity while the weights are zero."""

    def __init__(self, channels: int, modes: int, act: str = "leaky_relu") -> None:
        super().__init__()
        self.conv = SpectralTimeConv(channels, modes)
        self.act = activation(act)

    def forward(self, x: Tensor) -> Tensor:
        # act(0) = 0 for every allowed activation, so zero weights leave x unchanged
        return x + self.act(self.conv(x))


class WithTemporal(nn.Module):
    """A UNet block followed by a :class:`TemporalLayer` over its ``B * M`` output frames."""

    def __init__(self, block: nn.Module, channels: int, frames: int, modes: int, act: str) -> None:
        super().__init__()
        self.block, self.frames = block, frames
        self.temporal = TemporalLayer(channels, modes, act)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        h = self.block(x, emb)
        batch = h.shape[0] // self.frames
        return self.temporal(h.reshape(batch, self.frames, *h.shape[1:])).reshape(h.shape)


def block_channels(block: nn.Module) -> int:
    """Output channels of a residual or attention block."""
    return block.conv2.out_channels if isinstance(block, ResBlock) else block.proj.out_channels


def insert_temporal_layers(backbone: nn.Module, frames: int, modes: int, act: str = "leaky_relu") -> int:
    """Wrap every :class:`ResBlock` / :class:`AttentionBlock` of ``backbone`` in place; returns how many.

    The blocks sit in the UNet's ``EmbSequential`` stages (module lists), so each is replaced by a
    :class:`WithTemporal` around it: the UNet's own forward runs unchanged.
    """
    count = 0
    for parent in list(backbone.modules()):
        if not isinstance(parent, nn.ModuleList):
            continue
        for index, child in enumerate(parent):
            if isinstance(child, (ResBlock, AttentionBlock)):
                parent[index] = WithTemporal(child, block_channels(child), frames, modes, act)
                count += 1
    return count


class FrameEmbedding(nn.Module):
    """The backbone's noise embedding plus a learned vector per output frame (zero at initialization).

    Wraps the UNet's :class:`NoiseEmbedding` for ``time_embedding=start``: every frame is fed the start
    level's label, and this table is what tells the frames apart (a per-output-time embedding that
    starts at nothing, so the operator starts as the teacher evaluated at the start level).
    """

    def __init__(self, inner: NoiseEmbedding, frames: int) -> None:
        super().__init__()
        self.inner, self.frames = inner, frames
        self.offsets = nn.Parameter(torch.zeros(frames, inner.mlp[-1].out_features))

    def forward(self, noise_labels: Tensor, class_labels: Tensor | None = None) -> Tensor:
        emb = self.inner(noise_labels, class_labels)
        return emb + self.offsets.to(emb.dtype).repeat(len(emb) // self.frames, 1)  # frame-fastest rows


def add_frame_embeddings(backbone: nn.Module, frames: int) -> int:
    """Wrap every :class:`NoiseEmbedding` of ``backbone`` in a :class:`FrameEmbedding`; returns how many."""
    count = 0
    for parent in list(backbone.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, NoiseEmbedding):
                setattr(parent, name, FrameEmbedding(child, frames))
                count += 1
    return count


def edm_labels(sigmas: Tensor, sigma_min: float) -> Tensor:
    """EDM noise labels ``ln(sigma) / 4`` of the output levels, sigma clamped below at ``sigma_min``."""
    return sigmas.double().clamp(min=sigma_min).log().float() / 4


class DSNOOperator(nn.Module):
    """``x_T (B, C, H, W) -> states (B, M, C, H, W)`` at the output levels ``sigmas[1:]`` in one pass.

    Args:
        backbone: a raw network ``net(x, noise_labels, class_labels)`` built from the project's UNet
            (possibly wrapped in Patchify); it is modified in place (temporal layers inserted).
        frames: M, the number of output times.
        modes: Fourier modes kept by each temporal layer (``<= M // 2 + 1``).
        temporal: insert temporal layers (False: the knowledge-distillation baseline).
        act: the temporal layers' nonlinearity.
        sigma_data: the EDM preconditioning's data scale (the teacher's).
        sigma_min: the smallest level with a noise label (the teacher's), used for sigma = 0.
        time_embedding: how frames are told apart: ``output`` feeds frame m the label of its output
            level (the paper); ``start`` feeds every frame the start level's label (the input's true
            level) plus a learned per-frame embedding that starts at zero (:class:`FrameEmbedding`).

    The levels (``M + 1`` values, the start first) are a buffer, set from the trajectory data by
    :meth:`set_sigmas` (zeros until then) and saved with the weights.
    """

    def __init__(
        self,
        backbone: nn.Module,
        frames: int,
        modes: int = 2,
        temporal: bool = True,
        act: str = "leaky_relu",
        sigma_data: float = 0.5,
        sigma_min: float = 0.002,
        time_embedding: str = "start",
    ) -> None:
        super().__init__()
        check_range("task.M", frames, low=1)
        check_choice("task.time_embedding", time_embedding, TIME_EMBEDDINGS)
        check_range("task.sigma_data", sigma_data, low=0, low_inclusive=False)
        check_choice("task.activation", act, ACTIVATIONS)
        if temporal:
            check_range("task.modes", modes, low=1, high=frames // 2 + 1)
        self.backbone, self.frames, self.modes, self.act = backbone, int(frames), int(modes), act
        self.temporal, self.sigma_data, self.sigma_min = bool(temporal), float(sigma_data), float(sigma_min)
        self.temporal_layers = insert_temporal_layers(backbone, frames, modes, act) if temporal else 0
        if temporal and not self.temporal_layers:
            fail(
                f"the backbone {type(backbone).__name__} has no ResBlock / AttentionBlock to put temporal "
                "layers after; DSNO needs the project's UNet (fastsample.models.unet.UNet)"
            )
        for module in backbone.modules():
            if isinstance(module, NoiseEmbedding):
                # the target trajectory belongs to the label it was generated with: never drop it
                module.class_dropout = 0.0
        self.time_embedding = time_embedding
        if time_embedding == "start" and frames > 1 and not add_frame_embeddings(backbone, frames):
            fail(
                f"task.time_embedding=start needs the UNet's noise embedding (NoiseEmbedding); "
                f"{type(backbone).__name__} has none"
            )
        self.register_buffer("sigmas", torch.zeros(frames + 1, dtype=torch.float64))
        self.calls = 0  # forward passes (network evaluations): one per generated batch

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the data (the backbone's input shape)."""
        return tuple(self.backbone.input_shape)

    def set_sigmas(self, sigmas: Iterable[float]) -> None:
        """Set the ``M + 1`` levels: the start ``sigma_0 > 0`` then the M output levels, the last 0."""
        levels = torch.as_tensor(list(map(float, sigmas)), dtype=torch.float64)
        if levels.shape != (self.frames + 1,):
            fail(
                f"the operator has M={self.frames} output times but {len(levels) - 1} were given "
                f"(levels {levels.tolist()})"
            )
        if not bool((levels[:-1] > levels[1:]).all()) or float(levels[-1]) != 0.0:
            fail(f"operator levels must decrease strictly to 0; got {levels.tolist()}")
        self.sigmas.copy_(levels.to(self.sigmas.device))

    def check_ready(self) -> None:
        if float(self.sigmas[0]) <= 0:
            fail("the operator's levels are not set: train it on trajectories first (or load a trained one)")

    def forward(self, x: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """The states at ``sigmas[1:]`` from the start state ``x = x_T`` at ``sigmas[0]``: one evaluation."""
        self.check_ready()
        self.calls += 1
        batch, frames = x.shape[0], self.frames
        s0 = float(self.sigmas[0])
        sd2 = self.sigma_data**2
        c_in, c_skip = 1 / (s0**2 + sd2) ** 0.5, sd2 / (s0**2 + sd2)
        c_out = s0 * self.sigma_data / (s0**2 + sd2) ** 0.5
        out_sigmas = self.sigmas[1:]
        label_sigmas = out_sigmas if self.time_embedding == "output" else self.sigmas[:1].expand(frames)
        labels = edm_labels(label_sigmas, self.sigma_min).to(x.device).repeat(batch)  # frame-fastest order
        inputs = (c_in * x).repeat_interleave(frames, dim=0)
        if class_labels is not None:
            class_labels = torch.as_tensor(class_labels, device=x.device).reshape(-1)
            class_labels = class_labels.expand(batch).repeat_interleave(frames)
        raw = self.backbone(inputs, labels, class_labels).to(x.dtype)
        raw = raw.reshape(batch, frames, *x.shape[1:])
        start = x[:, None]
        x0 = c_skip * start + c_out * raw
        ratio = (out_sigmas / s0).to(device=x.device, dtype=x.dtype).reshape(1, frames, *([1] * (x.ndim - 1)))
        return x0 + ratio * (start - x0)

    def settings(self) -> dict[str, Any]:
        """What rebuilds this operator around a backbone (stored in bundles)."""
        return {
            "frames": self.frames,
            "modes": self.modes,
            "temporal": self.temporal,
            "act": self.act,
            "sigma_data": self.sigma_data,
            "sigma_min": self.sigma_min,
            "time_embedding": self.time_embedding,
        }


def backbone_state(operator: DSNOOperator) -> dict[str, Tensor]:
    """The backbone's weights under the plain UNet's names (temporal wrappers removed)."""
    return {
        plain_name(name): value for name, value in operator.backbone.state_dict().items() if is_teacher(name)
    }


def plain_name(name: str) -> str:
    """A backbone parameter's name in the plain UNet (wrappers ``block`` / ``inner`` removed)."""
    return name.replace(".block.", ".").replace("embed.inner.", "embed.")


def is_teacher(name: str) -> bool:
    """Whether a backbone parameter comes from the teacher (not a temporal layer or a frame offset)."""
    return ".temporal." not in name and not name.endswith("embed.offsets")


def load_backbone_weights(operator: DSNOOperator, teacher_net: nn.Module, setting: str = "task.net") -> None:
    """Copy the teacher network's weights into the operator's backbone (temporal layers untouched)."""
    source = teacher_net.state_dict()
    target = backbone_state(operator)
    missing = sorted(set(target) - set(source))
    extra = sorted(set(source) - set(target))
    mismatched = [name for name in target if name in source and source[name].shape != target[name].shape]
    if missing or extra or mismatched:
        first = (
            f"missing {missing[0]}"
            if missing
            else f"unexpected {extra[0]}"
            if extra
            else f"{mismatched[0]}: {tuple(source[mismatched[0]].shape)} vs "
            f"{tuple(target[mismatched[0]].shape)}"
        )
        fail(
            f"{setting} does not match the teacher's network ({first}); set {setting} to the teacher's "
            "architecture (e.g. net@task.net=unet_fmnist for the shipped model)"
        )
    wrapped = {plain_name(name): name for name in operator.backbone.state_dict() if is_teacher(name)}
    with torch.no_grad():
        own = operator.backbone.state_dict()
        for plain, value in source.items():
            own[wrapped[plain]].copy_(value)


def fingerprint(model: nn.Module) -> str:
    """A hash of a model's weights and buffers (names, shapes, dtypes, values): identifies a teacher."""
    digest = hashlib.sha1()
    for name, value in sorted(model.state_dict().items()):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.numpy().tobytes() if tensor.dtype != torch.bfloat16 else tensor.float().numpy())
    return digest.hexdigest()[:16]


def teacher_record(model: nn.Module) -> dict[str, Any]:
    """The teacher's identity (its description + weights fingerprint), stored with data and operators."""
    identity = model.identity() if hasattr(model, "identity") else {"class": type(model).__name__}
    shape = getattr(model, "image_shape", None)
    return {
        "identity": {k: list(v) if isinstance(v, tuple) else v for k, v in identity.items()},
        "fingerprint": fingerprint(model),
        "image_shape": list(shape) if shape is not None else None,
        "num_classes": getattr(model, "num_classes", None),
        "sigma_min": float(getattr(model, "sigma_min", 0.002)),
        "sigma_max": float(getattr(model, "sigma_max", 80.0)),
        "sigma_data": float(getattr(model, "sigma_data", 0.5)),
    }


# -- the training loss ------------------------------------------------------------------------------


def point_weights(
    sigmas: Tensor, weighting: str = "alpha_sigma", low: float = 1.0, high: float = 1e4
) -> Tensor:
    """Weights of the output levels ``sigmas``: ``clamp(1 / sigma, low, high)`` (VP alpha / sigma),
    ``uniform`` (all 1) or ``final`` (only the last point)."""
    check_choice("task.weighting", weighting, WEIGHTINGS)
    sigmas = sigmas.double()
    if weighting == "uniform":
        return torch.ones_like(sigmas)
    if weighting == "final":
        return torch.nn.functional.one_hot(torch.tensor(len(sigmas) - 1), len(sigmas)).double()
    ratio = torch.where(sigmas > 0, 1 / sigmas.clamp(min=1e-30), torch.full_like(sigmas, float("inf")))
    return ratio.clamp(low, high)


def dsno_loss(
    predicted: Tensor, target: Tensor, sigmas: Tensor, weights: Tensor, loss: str = "l2"
) -> tuple[Tensor, Tensor]:
    """Weighted trajectory loss: ``sum_m w_m d(x_m, x_m*) / sum_m w_m`` and the per-point terms.

    ``predicted`` / ``target``: ``(B, M, ...)`` states at ``sigmas`` (sigma space); both are scaled to
    the VP range ``x / sqrt(1 + sigma^2)`` first. ``d`` is the mean squared (``l2``) or absolute
    (``l1``) error per point.
    """
    check_choice("task.loss", loss, LOSSES)
    scale = (1 + sigmas.to(predicted.device, predicted.dtype) ** 2).rsqrt()
    scale = scale.reshape(1, -1, *([1] * (predicted.ndim - 2)))
    diff = (predicted - target) * scale
    per_point = (diff.square() if loss == "l2" else diff.abs()).flatten(2).mean(dim=(0, 2))
    weights = weights.to(per_point.device, per_point.dtype)
    return (weights * per_point).sum() / weights.sum(), per_point


def build_operator(net: dict, settings: dict[str, Any]) -> DSNOOperator:
    """A fresh operator around the backbone built from the network config ``net``."""
    backbone = instantiate(net)
    return DSNOOperator(backbone, **settings)


# -- bundles ------------------------------------------------------------------------------------------


def export_operator(
    operator: DSNOOperator,
    path: str | os.PathLike,
    *,
    net: dict,
    mode: str,
    teacher: dict[str, Any] | None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Save an operator (weights, settings, levels, teacher identity) as a DSNO bundle, atomically."""
    check_choice("task.mode", mode, MODES)
    operator.check_ready()
    bundle = {
        "format": OPERATOR_FORMAT,
        "mode": mode,
        "net": dict(net),
        "settings": operator.settings(),
        "sigmas": [float(s) for s in operator.sigmas],
        "image_shape": list(operator.input_shape),
        "teacher": teacher,
        "extra": dict(extra or {}),
        "state_dict": {k: v.detach().cpu() for k, v in operator.state_dict().items()},
    }
    save_torch_atomic(path, bundle)
    return Path(path)


def load_operator(
    path: str | os.PathLike, setting: str = "sampler.path"
) -> tuple[DSNOOperator, dict[str, Any]]:
    """Load a DSNO bundle (``model.pt`` of ``train.py task=dsno``) or a ``task=dsno`` Lightning checkpoint.

    Returns the operator (eval mode, frozen; EMA weights for checkpoints) and its record (mode, levels,
    teacher identity, network config).
    """
    path = Path(path)
    if not path.is_file():
        fail(f"{setting}={str(path)!r} does not exist; give the model.pt or a .ckpt of train.py task=dsno")
    try:
        content = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        fail(f"{setting}={str(path)!r} is not a readable checkpoint ({type(err).__name__}: {err})")
    if not isinstance(content, dict):
        fail(f"{setting}={str(path)!r} is not a DSNO operator (task=dsno bundle or checkpoint)")
    if content.get("format") != OPERATOR_FORMAT:
        content = _from_lightning(content, path, setting)
    try:
        operator = build_operator(content["net"], content["settings"])
    except UserError:
        raise
    except Exception as err:
        fail(f"{setting}={str(path)!r}: its network config cannot be built ({err})")
    try:
        operator.load_state_dict(content["state_dict"])
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        fail(
            f"{setting}={str(path)!r} does not fit the operator it describes "
            f"({lines[min(1, len(lines) - 1)]})"
        )
    record = {
        key: content.get(key) for key in ("mode", "net", "settings", "sigmas", "image_shape", "teacher")
    }
    record["extra"] = content.get("extra") or {}
    record["path"] = str(path)
    return operator.eval().requires_grad_(False), record


def _from_lightning(checkpoint: dict[str, Any], path: Path, setting: str) -> dict[str, Any]:
    """A ``task=dsno`` Lightning checkpoint in bundle form (the EMA operator's weights)."""
    record = checkpoint.get("dsno")
    hp = checkpoint.get("hyper_parameters") or {}
    if not isinstance(record, dict) or "net" not in hp:
        task = "diffusion or classifier" if "net" in hp else "another"
        fail(
            f"{setting}={str(path)!r} is not a DSNO operator: it is a checkpoint of {task} task, "
            "not task=dsno"
        )
    prefix = "ema.module."
    state = {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    return {
        "mode": hp.get("mode", "dsno"),
        "net": hp["net"],
        "settings": record["settings"],
        "sigmas": record["sigmas"],
        "image_shape": record.get("image_shape"),
        "teacher": record.get("teacher"),
        "extra": {
            "global_step": checkpoint.get("global_step"),
            "data_cost": record.get("data_cost"),
            "class_labels": record.get("class_labels"),
        },
        "state_dict": state,
    }
