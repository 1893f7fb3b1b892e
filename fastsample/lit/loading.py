"""Loading trained models from files: exported / shipped bundles (``.pt``) and Lightning checkpoints
(``.ckpt``).

The one place above both :mod:`fastsample.models` (which knows bundles only) and the LightningModules
(which know their checkpoints). Every loader reads the file once and dispatches on its content: a
bundle (it carries a ``format`` record) goes to :mod:`fastsample.models.bundle` /
:mod:`fastsample.models.vae`; a Lightning checkpoint of ``train.py task=...`` is rebuilt through its
LightningModule and handed over in bundle form, so both kinds end in the same network.

- :func:`load_denoiser` (``model=from_checkpoint``): a diffusion model as a denoiser;
- :func:`load_classifier`: a classifier as ``classifier(x, sigma) -> logits``; :func:`guidance_classifier`
  also takes a shipped asset name (``guidance=classifier``);
- :func:`load_vae` / :func:`vae_generator` (``generator=vae``): a VAE, or its decoder as an ES-DDPM prior;
- :func:`classifier_features`: a classifier's features for the metrics.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

from fastsample.diffusion.denoiser import Denoiser
from fastsample.lit.classifier import ClassifierModule
from fastsample.lit.diffusion import DiffusionModule
from fastsample.lit.vae import VAEModule
from fastsample.metrics import ClassifierFeatures
from fastsample.models import bundle
from fastsample.models.sigma_classifier import SigmaClassifier
from fastsample.models.vae import ConvVAE, vae_from_content
from fastsample.samplers.priors import LatentGenerator
from fastsample.utils.errors import fail

#: the shipped Fashion-MNIST classifier (``fastsample.models.bundle.asset_path``)
DEFAULT_CLASSIFIER = "fmnist_classifier.pt"
#: the shipped Fashion-MNIST VAE, the default ``generator=vae`` prior
DEFAULT_VAE = "fmnist_vae.pt"


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


def _module(checkpoint: dict[str, Any], path: Path, setting: str, module_class: type, task: str) -> Any:
    """The LightningModule of a ``task`` checkpoint, with the checkpoint's weights."""
    module = module_class(**_task_hparams(checkpoint, path, setting, module_class, task))
    bundle.load_weights(module, checkpoint["state_dict"], path, setting)
    return module


# -- diffusion models ---------------------------------------------------------------------------------


def load_denoiser(path: str | os.PathLike, **overrides: Any) -> Denoiser:
    """A diffusion bundle or ``task=diffusion`` Lightning checkpoint as a frozen, eval-mode denoiser.

    ``overrides`` adjust the parametrization. Checkpoints give their EMA weights. A missing, foreign
    or truncated file, a classifier or another task's checkpoint fail with a UserError naming
    ``model.path``.
    """
    path, setting = Path(path), "model.path"
    content = bundle.read_model_file(path, setting)
    if not bundle.is_bundle(content):
        module = _module(content, path, setting, DiffusionModule, "diffusion")
        content = {
            "format": bundle.BUNDLE_FORMAT,
            "net": module.hparams["net"],
            "parametrization": module.parametrization(),
            "num_classes": module.num_classes,
            "image_shape": module.image_shape,
            "state_dict": module.ema.module.state_dict(),
        }
    return bundle.denoiser_from_content(content, path, setting, overrides)


# -- classifiers --------------------------------------------------------------------------------------


def load_classifier(path: str | os.PathLike, setting: str = "classifier.path") -> SigmaClassifier:
    """A classifier bundle or ``task=classifier`` checkpoint as ``classifier(x, sigma) -> logits``.

    Eval mode, parameters frozen (gradients still flow to the input, for guidance). A diffusion bundle,
    another task's checkpoint, a foreign or truncated file fail with a UserError naming ``setting``.
    """
    path = Path(path)
    content = bundle.read_model_file(path, setting)
    if bundle.is_bundle(content):
        return bundle.classifier_from_content(content, path, setting)
    module = _module(content, path, setting, ClassifierModule, "classifier")
    return module.classifier().eval().requires_grad_(False)


def guidance_classifier(
    classifier: str | os.PathLike, setting: str = "guidance.classifier"
) -> SigmaClassifier | Any:
    """The classifier of ``guidance=classifier``: an existing file (bundle or ``.ckpt``), else the name
    of a shipped asset (conf/guidance/classifier.yaml builds its ``classifier`` through this)."""
    path = Path(str(classifier))
    if path.is_file() or os.sep in str(classifier):
        return load_classifier(path, setting=setting)
    return bundle.load_asset(str(classifier))


def classifier_features(
    path: str | os.PathLike | None = None, noise_label: float | None = None
) -> ClassifierFeatures:
    """Domain-classifier features ("Frechet classifier distance") from a classifier bundle file.

    ``path`` defaults to the shipped Fashion-MNIST classifier (``fmnist_classifier.pt`` in
    ``$FASTSAMPLE_ASSETS`` or the package's ``assets``); any bundle or ``.ckpt`` of ``train.py
    task=classifier`` works (read by :func:`load_classifier`).
    A clean classifier is used through its raw network with the bundle's noise label, so the
    extractor's name (``classifier:<hash of the network's weights>``) is the one
    ``ClassifierFeatures(network)`` gives anywhere else; ``noise_label`` overrides the bundle's.
    """
    if path is None:
        path = bundle.asset_path(DEFAULT_CLASSIFIER)
    classifier = load_classifier(path, setting="features.path")
    convention = getattr(classifier, "convention", {})
    if convention.get("kind") == "clean" and hasattr(classifier, "net"):
        label = convention.get("noise_label", 0.0) if noise_label is None else noise_label
        return ClassifierFeatures(classifier.net, noise_label=label)
    # A noise-conditioned (guidance) classifier: its own wrapper maps sigma = noise_label to the network.
    return ClassifierFeatures(classifier, noise_label=0.0 if noise_label is None else noise_label)


# -- VAEs ---------------------------------------------------------------------------------------------


def load_vae(path: str | os.PathLike, setting: str = "prior.path") -> ConvVAE:
    """A VAE bundle or ``task=vae`` Lightning checkpoint as an eval-mode, frozen :class:`ConvVAE`."""
    path = Path(path)
    content = bundle.read_model_file(path, setting)
    if bundle.is_bundle(content):
        return vae_from_content(content, path, setting)
    module = _module(content, path, setting, VAEModule, "vae")
    return module.vae.eval().requires_grad_(False)


def vae_generator(path: str | os.PathLike | None = None) -> LatentGenerator:
    """The decoder of a VAE bundle / ``task=vae`` checkpoint as an ES-DDPM prior (``generator=vae``);
    ``None``: the shipped ``fmnist_vae.pt``."""
    if path is None:
        resolved, setting = bundle.asset_path(DEFAULT_VAE), "asset"
    else:
        resolved, setting = Path(str(path)).expanduser(), "sampler.prior.path"
    vae = load_vae(resolved, setting)
    generator = LatentGenerator(vae.generate, vae.latent_dim, vae.input_shape, kind="vae", module=vae)
    generator.path = str(resolved)
    return generator
