"""Exported model bundles: weights + the network config + how to call it, in one file.

A bundle (``.pt``, written by ``train.py`` as ``model.pt`` or shipped in ``fastsample/assets``) is
self-contained: :func:`load_bundle` rebuilds a diffusion bundle as a ready denoiser,
:func:`load_classifier` a classifier bundle as a
:class:`~fastsample.models.sigma_classifier.SigmaClassifier`, and :func:`load_asset` either kind from
the shipped models (``make pretrain``). Lightning checkpoints (``.ckpt``) are read one layer up, through
the LightningModules, by :mod:`fastsample.lit.loading` (which also accepts bundles): this module knows
no Lightning.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NoReturn

import torch

from fastsample.diffusion.build import wrap_network
from fastsample.diffusion.denoiser import Denoiser
from fastsample.models.sigma_classifier import SigmaClassifier
from fastsample.utils.errors import UserError, brief, fail
from fastsample.utils.instantiation import instantiate
from fastsample.utils.io import save_torch_atomic

BUNDLE_FORMAT = "fastsample-bundle-v1"
CLASSIFIER_FORMAT = "fastsample-classifier-v1"
ASSETS_ENV = "FASTSAMPLE_ASSETS"


def export_bundle(module: Any, path: str | os.PathLike) -> Path:
    """Save a trained DiffusionModule's EMA network as a bundle at ``path`` (atomically)."""
    bundle = {
        "format": BUNDLE_FORMAT,
        "net": dict(module.hparams.net),
        "parametrization": module.parametrization(),
        "image_shape": list(module.image_shape) if module.image_shape else None,
        "num_classes": module.num_classes,
        "state_dict": {k: v.detach().cpu() for k, v in module.ema.module.state_dict().items()},
    }
    save_torch_atomic(path, bundle)
    return Path(path)


# -- reading files (shared with fastsample.lit.loading and fastsample.models.vae) -----------------------


def read_model_file(path: Path, setting: str = "model.path") -> dict[str, Any]:
    """The content of a bundle or Lightning checkpoint; a missing, unreadable or foreign file fails
    with a :class:`UserError` naming ``setting``."""
    if not path.is_file():
        fail(
            f"{setting}={str(path)!r} does not exist; give an exported bundle (.pt) or a Lightning "
            f"checkpoint (.ckpt) written by train.py"
        )
    try:
        content = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated / not a torch file: say which file and why
        fail(f"{setting}={str(path)!r} is not a readable checkpoint ({brief(err)})")
    if not isinstance(content, dict) or "state_dict" not in content:
        fail(f"{setting}={str(path)!r} is not a fastsample bundle or checkpoint (no state_dict inside)")
    return content


def is_bundle(content: dict[str, Any]) -> bool:
    """Whether ``content`` (of :func:`read_model_file`) is an exported bundle of any kind; Lightning
    checkpoints carry no ``format`` record."""
    return content.get("format") is not None


def load_weights(net: torch.nn.Module, state_dict: dict[str, Any], path: Path, setting: str) -> None:
    """``load_state_dict``, failing with the first mismatch when the weights are another architecture's."""
    try:
        net.load_state_dict(state_dict)
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        first = lines[1] if len(lines) > 1 else lines[0]
        fail(f"{setting}={str(path)!r} does not fit the network it describes ({first})")


def instantiate_net(content: dict[str, Any], path: Path, setting: str) -> torch.nn.Module:
    """The (untrained) network of a bundle's ``net`` config; an unbuildable config fails naming the file."""
    config = content.get("net")
    if not isinstance(config, dict) or "_target_" not in config:
        fail(f"{setting}={str(path)!r} has no network config (net._target_) inside")
    try:
        return instantiate(config)
    except UserError:
        raise
    except Exception as err:  # e.g. a _target_ that does not exist in this version
        fail(f"{setting}={str(path)!r}: its network config {config['_target_']} cannot be built ({err})")


def _not_a_bundle(path: Path, setting: str, loader: str) -> NoReturn:
    """Fail for a Lightning checkpoint handed to a bundle-only loader."""
    fail(
        f"{setting}={str(path)!r} is a Lightning checkpoint, not an exported bundle; "
        f"load it with fastsample.lit.loading.{loader}"
    )


# -- denoisers ----------------------------------------------------------------------------------------


def load_bundle(path: str | os.PathLike, **overrides: Any) -> Denoiser:
    """Load a diffusion bundle as a denoiser; ``overrides`` adjust the parametrization.

    Bundles only: a Lightning checkpoint (``.ckpt``) loads with
    :func:`fastsample.lit.loading.load_denoiser` (``model=from_checkpoint``).
    """
    path = Path(path)
    return denoiser_from_content(read_model_file(path), path, "model.path", overrides)


def denoiser_from_content(
    content: dict[str, Any], path: Path, setting: str, overrides: dict[str, Any]
) -> Denoiser:
    """A frozen, eval-mode denoiser from a diffusion bundle's content (or a checkpoint's, in bundle form).

    ``content`` holds ``net``, ``parametrization``, ``image_shape``, ``num_classes`` and ``state_dict``.
    """
    kind = content.get("format")
    if kind == CLASSIFIER_FORMAT:
        fail(
            f"{setting}={str(path)!r} is a classifier bundle (task=classifier), not a diffusion model; "
            "use it as a guidance classifier or metric feature network (load_classifier)"
        )
    if kind is None:
        _not_a_bundle(path, setting, "load_denoiser")
    if kind != BUNDLE_FORMAT:
        fail(f"{setting}={str(path)!r} is a {kind} file, not a diffusion model bundle")
    net = instantiate_net(content, path, setting)
    load_weights(net, content["state_dict"], path, setting)
    image_shape = tuple(content["image_shape"]) if content.get("image_shape") else None
    denoiser = wrap_network(
        net, {**content["parametrization"], **overrides}, image_shape, content.get("num_classes")
    )
    return denoiser.eval().requires_grad_(False)


# -- classifiers --------------------------------------------------------------------------------------


def export_classifier(module: Any, path: str | os.PathLike) -> Path:
    """Save a trained ClassifierModule as a classifier bundle at ``path`` (atomically).

    The bundle holds the network config and weights, ``noisy`` and the ``input`` convention record
    (:func:`fastsample.models.sigma_classifier.input_convention`) that :func:`load_classifier` obeys.
    """
    bundle = {
        "format": CLASSIFIER_FORMAT,
        "net": dict(module.hparams.net),
        "noisy": bool(module.hparams.noisy),
        "input": module.input_convention(),
        "image_shape": list(module.image_shape) if module.image_shape else None,
        "num_classes": module.num_classes,
        "state_dict": {k: v.detach().cpu() for k, v in module.net.state_dict().items()},
    }
    save_torch_atomic(path, bundle)
    return Path(path)


def load_classifier(path: str | os.PathLike, setting: str = "classifier.path") -> SigmaClassifier:
    """Load a classifier bundle as ``classifier(x, sigma) -> logits``.

    Eval mode, parameters frozen (gradients still flow to the input, for guidance). A diffusion bundle,
    a foreign or truncated file fail with a :class:`UserError` naming ``setting``. Bundles only: a
    ``task=classifier`` checkpoint loads with :func:`fastsample.lit.loading.load_classifier`.
    """
    path = Path(path)
    return classifier_from_content(read_model_file(path, setting), path, setting)


def classifier_from_content(content: dict[str, Any], path: Path, setting: str) -> SigmaClassifier:
    """A frozen, eval-mode :class:`SigmaClassifier` from a classifier bundle's content."""
    kind = content.get("format")
    if kind == BUNDLE_FORMAT:
        fail(
            f"{setting}={str(path)!r} is a diffusion model bundle, not a classifier; train one with "
            "train.py task=classifier (or experiment=pretrain_classifier)"
        )
    if kind is None:
        _not_a_bundle(path, setting, "load_classifier")
    if kind != CLASSIFIER_FORMAT:
        fail(f"{setting}={str(path)!r} is a {kind} file, not a classifier bundle")
    if not isinstance(content.get("input"), dict):
        fail(f"{setting}={str(path)!r} has no input convention record; re-export it with this version")
    net = instantiate_net(content, path, setting)
    load_weights(net, content["state_dict"], path, setting)
    return SigmaClassifier(net, content["input"]).eval().requires_grad_(False)


# -- shipped models ---------------------------------------------------------------------------------


def assets_dir() -> Path:
    """Where shipped models live: ``$FASTSAMPLE_ASSETS`` if set, else the package's ``assets`` folder."""
    return Path(os.environ.get(ASSETS_ENV) or Path(__file__).resolve().parents[1] / "assets")


def asset_path(name: str) -> Path:
    """The path of shipped model ``name``; a missing file says how to build it."""
    path = assets_dir() / name
    if not path.is_file():
        fail(
            f"shipped model {name!r} not found at {path}; `make pretrain` trains and installs it "
            f"(CPU, Fashion-MNIST), or set {ASSETS_ENV}=DIR to a folder that holds it"
        )
    return path


def load_asset(name: str, **overrides: Any) -> Denoiser | SigmaClassifier:
    """Load shipped model ``name`` (e.g. ``fmnist_diffusion.pt``): a denoiser or a classifier, by content.

    Shipped models are bundles. ``overrides`` adjust a diffusion model's parametrization (as in
    :func:`load_bundle`).
    """
    path = asset_path(name)
    setting = "asset"
    content = read_model_file(path, setting)
    if content.get("format") == CLASSIFIER_FORMAT:
        return classifier_from_content(content, path, setting)
    return denoiser_from_content(content, path, setting, overrides)
