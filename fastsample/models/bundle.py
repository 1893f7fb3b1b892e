"""Exported model bundles: weights + the network config + how to call it, in one file.

``sample.py model=from_checkpoint model.path=...`` loads a diffusion bundle (``.pt``) or a Lightning
checkpoint (``.ckpt``) of the diffusion task into a ready denoiser; :func:`load_classifier` does the
same for the classifier task (a :class:`~fastsample.models.sigma_classifier.SigmaClassifier`).
:func:`load_asset` loads either kind from the models shipped in ``fastsample/assets`` (``make pretrain``).
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

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


def _read(path: Path, setting: str = "model.path") -> dict[str, Any]:
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


def _load_weights(net: torch.nn.Module, state_dict: dict[str, Any], path: Path, setting: str) -> None:
    """``load_state_dict``, failing with the first mismatch when the weights are another architecture's."""
    try:
        net.load_state_dict(state_dict)
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        first = lines[1] if len(lines) > 1 else lines[0]
        fail(f"{setting}={str(path)!r} does not fit the network it describes ({first})")


def _task_hparams(
    checkpoint: dict[str, Any], path: Path, setting: str, module_class: type, task: str
) -> dict[str, Any]:
    """A Lightning checkpoint's hyper-parameters, checked to be those of ``module_class``."""
    hp = dict(checkpoint.get("hyper_parameters") or {})
    allowed = set(inspect.signature(module_class.__init__).parameters) - {"self"}
    if "net" not in hp or set(hp) - allowed:
        fail(
            f"{setting}={str(path)!r} is not a checkpoint of task={task} "
            f"(hyper-parameters: {sorted(hp) or 'none'})"
        )
    return hp


def _from_lightning(checkpoint: dict[str, Any], path: Path, setting: str = "model.path") -> dict[str, Any]:
    """Turn a DiffusionModule checkpoint into bundle form (EMA weights)."""
    from fastsample.lit.diffusion import DiffusionModule

    hp = _task_hparams(checkpoint, path, setting, DiffusionModule, "diffusion")
    module = DiffusionModule(**hp)
    _load_weights(module, checkpoint["state_dict"], path, setting)
    return {
        "net": hp["net"],
        "parametrization": module.parametrization(),
        "num_classes": module.num_classes,
        "image_shape": module.image_shape,
        "state_dict": module.ema.module.state_dict(),
    }


def load_bundle(path: str | os.PathLike, **overrides: Any) -> Denoiser:
    """Load a bundle or Lightning checkpoint as a denoiser; ``overrides`` adjust the parametrization."""
    path = Path(path)
    return _denoiser(_read(path), path, "model.path", overrides)


def _denoiser(content: dict[str, Any], path: Path, setting: str, overrides: dict[str, Any]) -> Denoiser:
    if content.get("format") == CLASSIFIER_FORMAT:
        fail(
            f"{setting}={str(path)!r} is a classifier bundle (task=classifier), not a diffusion model; "
            "use it as a guidance classifier or metric feature network (load_classifier)"
        )
    if content.get("format") != BUNDLE_FORMAT:
        content = _from_lightning(content, path, setting)
    net = _instantiate_net(content, path, setting)
    _load_weights(net, content["state_dict"], path, setting)
    image_shape = tuple(content["image_shape"]) if content.get("image_shape") else None
    denoiser = wrap_network(
        net, {**content["parametrization"], **overrides}, image_shape, content.get("num_classes")
    )
    return denoiser.eval().requires_grad_(False)


def _instantiate_net(content: dict[str, Any], path: Path, setting: str) -> torch.nn.Module:
    config = content.get("net")
    if not isinstance(config, dict) or "_target_" not in config:
        fail(f"{setting}={str(path)!r} has no network config (net._target_) inside")
    try:
        return instantiate(config)
    except UserError:
        raise
    except Exception as err:  # e.g. a _target_ that does not exist in this version
        fail(f"{setting}={str(path)!r}: its network config {config['_target_']} cannot be built ({err})")


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
    """Load a classifier bundle (or a classifier-task ``.ckpt``) as ``classifier(x, sigma) -> logits``.

    Eval mode, parameters frozen (gradients still flow to the input, for guidance). A diffusion bundle,
    another task's checkpoint, a foreign or truncated file fail with a :class:`UserError` naming ``setting``.
    """
    path = Path(path)
    return _classifier(_read(path, setting), path, setting)


def _classifier(content: dict[str, Any], path: Path, setting: str) -> SigmaClassifier:
    if content.get("format") == BUNDLE_FORMAT:
        fail(
            f"{setting}={str(path)!r} is a diffusion model bundle, not a classifier; train one with "
            "train.py task=classifier (or experiment=pretrain_classifier)"
        )
    if content.get("format") != CLASSIFIER_FORMAT:
        from fastsample.lit.classifier import ClassifierModule

        hp = _task_hparams(content, path, setting, ClassifierModule, "classifier")
        module = ClassifierModule(**hp)
        _load_weights(module, content["state_dict"], path, setting)
        return module.classifier().eval().requires_grad_(False)
    if not isinstance(content.get("input"), dict):
        fail(f"{setting}={str(path)!r} has no input convention record; re-export it with this version")
    net = _instantiate_net(content, path, setting)
    _load_weights(net, content["state_dict"], path, setting)
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

    ``overrides`` adjust a diffusion model's parametrization (as in :func:`load_bundle`).
    """
    path = asset_path(name)
    setting = "asset"
    content = _read(path, setting)
    if content.get("format") == CLASSIFIER_FORMAT:
        return _classifier(content, path, setting)
    return _denoiser(content, path, setting, overrides)
