"""DiffusionModule: trains a backbone with the EDM or DDPM objective and keeps an EMA for sampling."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from fastsample.diffusion.build import wrap_network
from fastsample.diffusion.denoiser import Denoiser
from fastsample.diffusion.discrete import DiscreteSchedule
from fastsample.diffusion.losses import ddpm_loss, edm_loss
from fastsample.lit.optim import configure_optimizers
from fastsample.models.bundle import export_bundle
from fastsample.models.ema import make_ema
from fastsample.utils.errors import check_choice, check_range
from fastsample.utils.instantiation import instantiate

OBJECTIVES = ("edm", "ddpm")


class DiffusionModule(pl.LightningModule):
    """Denoising diffusion training; ``denoiser(ema=True)`` is what samplers and exports use.

    ``net`` is the backbone's config (``_target_`` + arguments), instantiated here so checkpoints
    carry it and can be rebuilt without the original Hydra run.
    """

    def __init__(
        self,
        net: DictConfig | dict,
        objective: str = "edm",
        prediction: str = "eps",
        beta_schedule: str = "linear",
        timesteps: int = 1000,
        max_timestep: int | None = None,
        sigma_data: float = 0.5,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        p_mean: float = -1.2,
        p_std: float = 1.2,
        lr: float = 2e-4,
        warmup_steps: int = 0,
        weight_decay: float = 0.0,
        ema_decay: float = 0.999,
        grad_clip: float | None = None,
    ) -> None:
        super().__init__()
        check_choice("task.objective", objective, OBJECTIVES)
        check_range("task.lr", lr, low=0, low_inclusive=False)
        check_range("task.ema_decay", ema_decay, low=0, high=1)
        if max_timestep is not None:
            check_range("task.max_timestep", max_timestep, low=1, high=timesteps)
        net_config = OmegaConf.to_container(net, resolve=True) if isinstance(net, DictConfig) else dict(net)
        self.save_hyperparameters(ignore=["net"])
        self.hparams["net"] = net_config  # the resolved config, so checkpoints rebuild the network
        self.net = instantiate(net_config)
        # The average is updated in place, never by gradients; frozen, DDP does not see it as unused.
        self.ema = make_ema(self.net, ema_decay).requires_grad_(False)
        self.image_shape = tuple(getattr(self.net, "input_shape", ()) or ()) or None
        # wrappers (Patchify) nest the backbone config one level down
        self.num_classes = net_config.get("num_classes") or net_config.get("net", {}).get("num_classes")

    # -- the denoiser view used by samplers and exports ----------------------------------------
    def parametrization(self) -> dict[str, Any]:
        """How the raw network maps to sigma space (stored in exported bundles)."""
        hp = self.hparams
        if hp.objective == "edm":
            return {
                "kind": "edm",
                "sigma_data": hp.sigma_data,
                "sigma_min": hp.sigma_min,
                "sigma_max": hp.sigma_max,
            }
        return {
            "kind": "ddpm",
            "prediction": hp.prediction,
            "beta_schedule": hp.beta_schedule,
            "timesteps": hp.timesteps,
        }

    def denoiser(self, ema: bool = True) -> Denoiser:
        """The (EMA) network wrapped as ``D(x, sigma, class_labels=...)``."""
        net = self.ema.module if ema else self.net
        return wrap_network(net, self.parametrization(), self.image_shape, self.num_classes)

    def sigma_upper(self) -> float | None:
        """The largest training sigma when training is restricted to ``t <= max_timestep``."""
        if self.hparams.max_timestep is None:
            return None
        table = DiscreteSchedule(self.hparams.beta_schedule, self.hparams.timesteps).sigmas
        return float(table[self.hparams.max_timestep - 1])

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor], ema: bool = False) -> torch.Tensor:
        """The configured objective on one batch of (images, labels)."""
        images, labels = batch
        labels = labels if self.num_classes else None
        denoiser, hp = self.denoiser(ema=ema), self.hparams
        if hp.objective == "edm":
            return edm_loss(
                denoiser,
                images,
                labels,
                p_mean=hp.p_mean,
                p_std=hp.p_std,
                sigma_data=hp.sigma_data,
                sigma_upper=self.sigma_upper(),
            )
        return ddpm_loss(denoiser, images, labels, max_timestep=hp.max_timestep)

    # -- Lightning hooks -------------------------------------------------------------------------
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, sync_dist=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        # The same noise at every validation, so the EMA's loss curve is comparable across epochs.
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(batch_idx)
            loss = self.loss(batch, ema=True)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)

    def export(self, path: Any) -> Any:
        """Write the EMA model as a bundle for ``sample.py model=from_checkpoint``."""
        return export_bundle(self, path)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.ema.update_parameters(self.net)

    def configure_optimizers(self) -> Any:
        """Adam, with a linear learning-rate warm-up over ``warmup_steps``."""
        hp = self.hparams
        return configure_optimizers(
            self, self.net.parameters(), lr=hp.lr, weight_decay=hp.weight_decay, warmup_steps=hp.warmup_steps
        )
