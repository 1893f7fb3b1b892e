"""ClassifierModule: trains an image classifier, clean or noise-conditioned (for classifier guidance)."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from fastsample.diffusion.denoiser import append_dims
from fastsample.diffusion.losses import truncated_lognormal
from fastsample.lit.optim import LR_SCHEDULES, configure_optimizers
from fastsample.models.bundle import export_classifier
from fastsample.models.sigma_classifier import SigmaClassifier, input_convention
from fastsample.utils.errors import check_choice, check_range
from fastsample.utils.instantiation import instantiate


class ClassifierModule(pl.LightningModule):
    """Cross-entropy training of ``net`` (e.g. :class:`fastsample.models.classifier.NoisyClassifier`).

    ``net`` is the network's config (``_target_`` + arguments), instantiated here so checkpoints carry
    it. :meth:`classifier` is the network in sigma space, ``classifier(x, sigma) -> logits``, exactly as
    guidance code and exported bundles (:func:`fastsample.lit.loading.load_classifier`) call it; the
    training loss goes through the same object, so there is one input convention
    (:mod:`fastsample.models.sigma_classifier`):

    * ``noisy=true`` (guidance classifier): each image is noised, ``x = x0 + sigma * eps`` with
      ``ln sigma ~ N(p_mean, p_std^2)`` (EDM's log-normal), and the network sees
      ``net(x / sqrt(sigma^2 + sigma_data^2), ln(sigma) / 4)``: EDM's ``c_in`` and ``c_noise``.
    * ``noisy=false`` (clean classifier, e.g. for classifier features in metrics): ``net(x0, 0.0)``,
      the convention of :class:`fastsample.metrics.features.ClassifierFeatures`.

    Logs ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc`` (and, when noisy, ``val/acc_clean``:
    accuracy at ``sigma_min``). Validation noise is the same at every validation, so curves compare.
    """

    def __init__(
        self,
        net: DictConfig | dict,
        noisy: bool = False,
        sigma_data: float = 0.5,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        p_mean: float = -1.2,
        p_std: float = 1.2,
        lr: float = 1e-3,
        head_lr_scale: float = 1.0,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_schedule: str = "constant",
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        check_choice("task.lr_schedule", lr_schedule, LR_SCHEDULES)
        check_range("task.lr", lr, low=0, low_inclusive=False)
        check_range("task.head_lr_scale", head_lr_scale, low=0, low_inclusive=False)
        check_range("task.sigma_min", sigma_min, low=0, low_inclusive=False)
        check_range("task.sigma_max", sigma_max, low=sigma_min, low_inclusive=False)
        check_range("task.p_std", p_std, low=0, low_inclusive=False)
        check_range("task.label_smoothing", label_smoothing, low=0, high=1, high_inclusive=False)
        net_config = OmegaConf.to_container(net, resolve=True) if isinstance(net, DictConfig) else dict(net)
        self.save_hyperparameters(ignore=["net"])
        self.hparams["net"] = net_config  # the resolved config, so checkpoints rebuild the network
        self.net = instantiate(net_config)
        self.num_classes = getattr(self.net, "num_classes", None) or net_config.get("num_classes")
        shape = getattr(self.net, "input_shape", None)
        self.image_shape = tuple(shape) if shape is not None else None

    # -- the sigma-space view used by guidance and exports --------------------------------------
    def input_convention(self) -> dict[str, Any]:
        """How ``(x, sigma)`` maps to the raw network's input (stored in exported bundles)."""
        hp = self.hparams
        return input_convention(bool(hp.noisy), hp.sigma_data, hp.sigma_min)

    def classifier(self) -> SigmaClassifier:
        """The network as ``classifier(x, sigma) -> logits`` (shares this module's parameters)."""
        return SigmaClassifier(self.net, self.input_convention())

    def noisy_batch(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(x0 + sigma * eps, sigma)`` with log-normal sigmas when noisy; ``(x0, None)`` when clean."""
        if not self.hparams.noisy:
            return images, None
        hp = self.hparams
        sigma = truncated_lognormal(len(images), hp.p_mean, hp.p_std, hp.sigma_max, device=images.device)
        return images + append_dims(sigma, images.ndim).to(images.dtype) * torch.randn_like(images), sigma

    def step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        images, labels = batch
        x, sigma = self.noisy_batch(images)
        logits = self.classifier()(x, sigma)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing)
        accuracy = (logits.argmax(dim=1) == labels).float().mean()
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, prog_bar=True, on_step=on_step, on_epoch=True, sync_dist=True)
        self.log(f"{stage}/acc", accuracy, prog_bar=True, on_step=on_step, on_epoch=True, sync_dist=True)
        return loss

    # -- Lightning hooks -------------------------------------------------------------------------
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.step(batch, "train")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(batch_idx)
            self.step(batch, "val")
        if self.hparams.noisy:
            images, labels = batch
            logits = self.classifier()(images, self.hparams.sigma_min)
            accuracy = (logits.argmax(dim=1) == labels).float().mean()
            self.log("val/acc_clean", accuracy, on_epoch=True, sync_dist=True)

    def export(self, path: Any) -> Any:
        """Write the classifier as a bundle for :func:`fastsample.lit.loading.load_classifier`."""
        return export_classifier(self, path)

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The network's parameters, the output layer (``net.head``, if any) at ``lr * head_lr_scale``.

        Why a separate rate: NoisyClassifier's pooled features (GroupNorm, SiLU, average pool) are
        O(0.3), so confident logits need output weights of O(10); Adam moves a weight about ``lr`` per
        step, so with one rate the logits stay under-confident for thousands of steps.
        """
        head = getattr(self.net, "head", None)
        head_params = list(head.parameters()) if isinstance(head, torch.nn.Module) else []
        if not head_params or self.hparams.head_lr_scale == 1.0:
            return [{"params": list(self.net.parameters())}]
        head_ids = {id(p) for p in head_params}
        body = [p for p in self.net.parameters() if id(p) not in head_ids]
        return [{"params": body}, {"params": head_params, "lr": self.hparams.lr * self.hparams.head_lr_scale}]

    def configure_optimizers(self) -> Any:
        """Adam; a linear warm-up over ``warmup_steps``, then constant or cosine decay to 0 at the end."""
        hp = self.hparams
        return configure_optimizers(
            self,
            self.parameter_groups(),
            lr=hp.lr,
            weight_decay=hp.weight_decay,
            warmup_steps=hp.warmup_steps,
            lr_schedule=hp.lr_schedule,
        )
