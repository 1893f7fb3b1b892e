"""VAEModule: trains a convolutional VAE whose decoder serves as an ES-DDPM generator prior."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from fastsample.lit.optim import LR_SCHEDULES, configure_optimizers
from fastsample.models.vae import ConvVAE, export_vae, gaussian_nll, kl_to_standard_normal
from fastsample.utils.errors import check_choice, check_range
from fastsample.utils.images import grid, save_png, to_uint8
from fastsample.utils.instantiation import instantiate


class VAEModule(pl.LightningModule):
    """The negative ELBO ``NLL(x | z) + beta * KL(q(z | x) || N(0, I))``, per pixel.

    ``net`` is the VAE's config (``_target_`` + arguments, e.g. conf/net/vae_fmnist.yaml),
    instantiated here so checkpoints carry it. ``decoder_std=null`` uses the calibrated Gaussian
    decoder (its variance is the batch MSE), a number fixes it. ``kl_warmup_steps`` ramps ``beta``
    up linearly from 0 (avoids early posterior collapse). Logs ``train/loss``, ``train/mse``,
    ``train/kl`` (nats per latent dimension is ``kl / latent_dim``) and the same under ``val/``; every
    validation writes a grid of prior samples (top) and test reconstructions (bottom pairs) to
    ``<output_dir>/grids/vae-step-N.png``.
    """

    def __init__(
        self,
        net: DictConfig | dict,
        beta: float = 1.0,
        decoder_std: float | None = None,
        kl_warmup_steps: int = 0,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_schedule: str = "constant",
        grid_samples: int = 32,
    ) -> None:
        super().__init__()
        check_range("task.beta", beta, low=0)
        check_range("task.lr", lr, low=0, low_inclusive=False)
        check_range("task.kl_warmup_steps", kl_warmup_steps, low=0)
        check_range("task.grid_samples", grid_samples, low=0)
        check_choice("task.lr_schedule", lr_schedule, LR_SCHEDULES)
        if decoder_std is not None:
            check_range("task.decoder_std", decoder_std, low=0, low_inclusive=False)
        net_config = OmegaConf.to_container(net, resolve=True) if isinstance(net, DictConfig) else dict(net)
        self.save_hyperparameters(ignore=["net"])
        self.hparams["net"] = net_config  # the resolved config, so checkpoints rebuild the network
        self.vae: ConvVAE = instantiate(net_config)
        self.image_shape = tuple(self.vae.input_shape)
        self.num_classes = None

    def beta_now(self) -> float:
        """The KL weight at the current step (linear warm-up from 0 over ``kl_warmup_steps``)."""
        warmup = self.hparams.kl_warmup_steps
        ramp = min(1.0, self.global_step / warmup) if warmup else 1.0
        return self.hparams.beta * ramp

    def losses(self, images: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
        """Per-pixel negative ELBO (with KL weight ``beta``), the MSE and the KL (nats per image)."""
        recon, mean, log_var = self.vae(images)
        nll, mse = gaussian_nll(images, recon, self.hparams.decoder_std)
        kl = kl_to_standard_normal(mean, log_var)
        pixels = images[0].numel()
        return {"loss": (nll + beta * kl).mean() / pixels, "mse": mse, "kl": kl.mean()}

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        values = self.losses(batch[0], self.beta_now())
        for name, value in values.items():
            self.log(
                f"train/{name}", value, prog_bar=name != "kl", on_step=True, on_epoch=True, sync_dist=True
            )
        return values["loss"]

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        # The same posterior noise at every validation (full beta), so the curves compare.
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(batch_idx)
            values = self.losses(batch[0], self.hparams.beta)
        for name, value in values.items():
            self.log(f"val/{name}", value, prog_bar=name == "loss", sync_dist=True)
        if batch_idx == 0:
            self._val_images = batch[0][: self.hparams.grid_samples // 2]

    def on_validation_epoch_end(self) -> None:
        images = getattr(self, "_val_images", None)
        if not self.hparams.grid_samples or images is None or self.trainer.sanity_checking:
            return
        if not self.trainer.is_global_zero:
            return
        with torch.no_grad():
            generator = torch.Generator().manual_seed(0)
            z = torch.randn(self.hparams.grid_samples, self.vae.latent_dim, generator=generator)
            samples = self.vae.generate(z.to(self.device))
            recon = self.vae.generate(self.vae.encode(images)[0])
        pairs = torch.stack([images, recon], dim=1).flatten(0, 1)
        picture = grid(to_uint8(torch.cat([samples, pairs])), nrow=8)
        root = Path(self.trainer.default_root_dir or ".")
        save_png(picture, root / "grids" / f"vae-step-{self.global_step:07d}.png")

    def export(self, path: Any) -> Any:
        """Write the VAE as a bundle for :func:`fastsample.lit.loading.load_vae` / ``generator=vae``."""
        return export_vae(self, path)

    def configure_optimizers(self) -> Any:
        """Adam; a linear warm-up over ``warmup_steps``, then constant or cosine decay to 0 at the end."""
        hp = self.hparams
        return configure_optimizers(
            self,
            self.vae.parameters(),
            lr=hp.lr,
            weight_decay=hp.weight_decay,
            warmup_steps=hp.warmup_steps,
            lr_schedule=hp.lr_schedule,
        )
