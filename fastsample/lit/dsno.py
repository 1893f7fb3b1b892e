"""DSNOModule: train a :class:`~fastsample.models.dsno.DSNOOperator` on teacher trajectories (``task=dsno``).

The operator's backbone is built from ``net`` (the teacher's architecture) and, at fit start, takes the
teacher's weights; its output levels come from the trajectory data (:mod:`fastsample.data.trajectories`,
whose DataModule also holds the teacher). The loss (:func:`~fastsample.models.dsno.dsno_loss`) is a
weighted sum over the M trajectory points, by default with DSNO's weights
``w_m = clamp(alpha_m / sigma_m, 1, 1e4)`` (VP ``alpha / sigma = 1 / sigma`` in sigma space, so the
final frame at sigma = 0 weighs 1e4) on states scaled to the VP range (``x / sqrt(1 + sigma^2)``),
normalized by the weights' sum so the logged value reads as a per-pixel error. ``mode=kd`` is the
knowledge-distillation baseline: the same backbone without temporal layers, one output (sigma = 0),
trained on the final frame only.

Logged: ``train/loss``, ``val/loss`` (EMA operator), ``val/final_rmse`` (RMS error of the EMA operator's
sample against the teacher's), sample grids of fixed seeds every ``grid_every_n_steps``.
``export`` writes the EMA operator as a DSNO bundle (``<output_dir>/model.pt``), which
``sample.py sampler=dsno sampler.path=...`` loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from fastsample.lit.optim import configure_optimizers
from fastsample.models.dsno import (
    LOSSES,
    MODES,
    WEIGHTINGS,
    DSNOOperator,
    build_operator,
    dsno_loss,
    export_operator,
    load_backbone_weights,
    point_weights,
)
from fastsample.models.ema import make_ema
from fastsample.utils.errors import check_choice, check_range, fail
from fastsample.utils.images import grid, save_png, to_uint8
from fastsample.utils.seeding import SeedNoise, labels_for

INITS = ("teacher", "random")


class DSNOModule(pl.LightningModule):
    """Trains a DSNO operator (or the KD baseline) on a :class:`TrajectoryDataModule`'s trajectories.

    Args:
        net: the backbone's network config (the teacher's architecture: its weights are copied in).
        mode: ``dsno`` (temporal layers, all M points) or ``kd`` (no temporal layers, the final frame).
        M: output times of the operator; must equal the trajectories' ``dataset.M`` (``dsno`` mode).
        modes: Fourier modes per temporal layer (``<= M // 2 + 1``).
        activation: the temporal layers' nonlinearity (leaky_relu as in the paper).
        time_embedding: ``start`` (every frame gets the start level's label plus a learned per-frame
            embedding, zero at initialization: the operator starts as the teacher's one-step prediction)
            or ``output`` (the paper: each frame gets its output level's label).
        loss / weighting / weight_min / weight_max: see :func:`fastsample.models.dsno.dsno_loss` and
            :func:`~fastsample.models.dsno.point_weights`.
        init: ``teacher`` (copy the teacher's weights into the backbone) or ``random``.
        lr / warmup_steps / weight_decay / ema_decay: Adam with linear warm-up; EMA of the operator.
        grid_every_n_steps / grid_seeds: sample grids of the EMA operator (0: none).
    """

    def __init__(
        self,
        net: DictConfig | dict,
        mode: str = "dsno",
        M: int = 4,
        modes: int = 2,
        activation: str = "leaky_relu",
        time_embedding: str = "start",
        loss: str = "l2",
        weighting: str = "alpha_sigma",
        weight_min: float = 1.0,
        weight_max: float = 1e4,
        init: str = "teacher",
        lr: float = 2e-4,
        warmup_steps: int = 0,
        weight_decay: float = 0.0,
        ema_decay: float = 0.999,
        grid_every_n_steps: int = 500,
        grid_seeds: int = 64,
    ) -> None:
        super().__init__()
        check_choice("task.mode", mode, MODES)
        check_choice("task.loss", loss, LOSSES)
        check_choice("task.weighting", weighting, WEIGHTINGS)
        check_choice("task.init", init, INITS)
        check_range("task.M", M, low=1)
        check_range("task.lr", lr, low=0, low_inclusive=False)
        check_range("task.ema_decay", ema_decay, low=0, high=1)
        check_range("task.weight_min", weight_min, low=0, low_inclusive=False)
        check_range("task.weight_max", weight_max, low=weight_min)
        net_config = OmegaConf.to_container(net, resolve=True) if isinstance(net, DictConfig) else dict(net)
        self.save_hyperparameters(ignore=["net"])
        self.hparams["net"] = net_config
        self.operator: DSNOOperator = build_operator(net_config, self.operator_settings())
        self.ema = make_ema(self.operator, ema_decay).requires_grad_(False)
        self.image_shape = self.operator.input_shape
        self.teacher: dict[str, Any] | None = None  # the teacher's record, set from the data at fit start
        self.class_labels: Any = None  # the trajectories' label mode (null: unconditional)
        self.data_cost: dict[str, Any] = {}

    def operator_settings(self, sigma_data: float = 0.5, sigma_min: float = 0.002) -> dict[str, Any]:
        hp = self.hparams
        kd = hp.mode == "kd"
        return {
            "frames": 1 if kd else hp.M,
            "modes": hp.modes,
            "temporal": not kd,
            "act": hp.activation,
            "time_embedding": hp.time_embedding,
            "sigma_data": sigma_data,
            "sigma_min": sigma_min,
        }

    # -- wiring to the data and the teacher ------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not callable(getattr(datamodule, "metadata", None)):
            fail(
                "task=dsno trains on teacher trajectories: use the trajectory dataset (conf/trajectories, "
                "which task=dsno selects), not an image dataset"
            )
        self.attach_data(datamodule.metadata(), datamodule.teacher_model())
        if hasattr(datamodule, "generation_cost"):
            self.data_cost = datamodule.generation_cost()

    def attach_data(self, meta: dict[str, Any], teacher: Any) -> None:
        """Take the output levels from trajectory metadata ``meta``; copy ``teacher``'s weights in."""
        hp = self.hparams
        if hp.mode == "dsno" and meta["M"] != hp.M:
            fail(
                f"task.M={hp.M} but the trajectories hold M={meta['M']} points (dataset.M); "
                f"set task.M={meta['M']} or regenerate with dataset.M={hp.M}"
            )
        if tuple(meta["shape"]) != tuple(self.image_shape):
            fail(
                f"the trajectories' states have shape {tuple(meta['shape'])} but task.net takes "
                f"{tuple(self.image_shape)}; set task.net to the teacher's architecture"
            )
        sigmas = [float(s) for s in meta["sigmas"]]
        levels = sigmas if hp.mode == "dsno" else [sigmas[0], sigmas[-1]]
        record = meta["teacher"]
        stale = self.teacher is not None and self.teacher.get("fingerprint") != record["fingerprint"]
        if stale or (
            float(self.operator.sigmas[0]) > 0 and [float(s) for s in self.operator.sigmas] != levels
        ):
            fail(
                "this DSNO operator was trained on other trajectories (teacher or levels differ); "
                "start a new run for these data"
            )
        # EDM preconditioning of the teacher: its sigma_data and smallest labelled level
        for operator in (self.operator, self.ema.module):
            operator.sigma_data, operator.sigma_min = record["sigma_data"], record["sigma_min"]
            operator.set_sigmas(levels)
        if hp.init == "teacher" and self.teacher is None:
            net = getattr(teacher, "net", None)
            if net is None or type(teacher).__name__ != "EDMDenoiser":
                fail(
                    f"task.init=teacher copies an EDM-parametrized UNet's weights, but the teacher is a "
                    f"{type(teacher).__name__}; use task.init=random for it"
                )
            load_backbone_weights(self.operator, net)
            load_backbone_weights(self.ema.module, net)
        self.teacher = record
        self.class_labels = meta.get("class_labels")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["dsno"] = {
            "settings": self.ema.module.settings(),
            "sigmas": [float(s) for s in self.ema.module.sigmas],
            "image_shape": list(self.image_shape),
            "teacher": self.teacher,
            "class_labels": self.class_labels,
            "data_cost": self.data_cost,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        stored = checkpoint.get("hyper_parameters") or {}
        for key in ("mode", "M", "modes", "time_embedding"):
            if key in stored and stored[key] != self.hparams[key]:
                fail(
                    f"task.{key}={self.hparams[key]} but the checkpoint was trained with "
                    f"task.{key}={stored[key]}; resume with task.{key}={stored[key]} or start a new run"
                )
        record = checkpoint.get("dsno") or {}
        # when resuming a fit, setup() has attached this run's data already: it must be the same data
        current = [float(s) for s in self.operator.sigmas]
        if self.teacher is not None and (
            (record.get("teacher") or {}).get("fingerprint") != self.teacher.get("fingerprint")
            or (record.get("sigmas") and [float(s) for s in record["sigmas"]] != current)
        ):
            fail(
                "the checkpoint was trained on trajectories of another teacher or at other levels than "
                "this run's dataset; resume with the same dataset settings or start a new run"
            )
        self.teacher = record.get("teacher")
        self.class_labels = record.get("class_labels")
        settings = record.get("settings") or {}
        for operator in (self.operator, self.ema.module):
            operator.sigma_data = settings.get("sigma_data", operator.sigma_data)
            operator.sigma_min = settings.get("sigma_min", operator.sigma_min)

    # -- training ---------------------------------------------------------------------------------------
    def targets(self, states: Tensor) -> Tensor:
        """The supervised points of a ``(B, M + 1, ...)`` trajectory batch (all, or the final one for KD)."""
        return states[:, 1:] if self.hparams.mode == "dsno" else states[:, -1:]

    def loss(self, batch: tuple[Tensor, Tensor], ema: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """(weighted loss, per-point terms, predicted states) of the live or EMA operator on a batch."""
        states, labels = batch
        operator = self.ema.module if ema else self.operator
        predicted = operator(states[:, 0], labels if bool((labels >= 0).any()) else None)
        hp = self.hparams
        out_sigmas = operator.sigmas[1:]
        weights = point_weights(out_sigmas, hp.weighting, hp.weight_min, hp.weight_max)
        loss, per_point = dsno_loss(predicted, self.targets(states), out_sigmas, weights, hp.loss)
        return loss, per_point, predicted

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss, _, _ = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, sync_dist=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        loss, _, predicted = self.loss(batch, ema=True)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        # the last point is the sample: its RMS error against the teacher's sample of the same noise
        final_rmse = (predicted[:, -1] - batch[0][:, -1]).square().mean().sqrt()
        self.log("val/final_rmse", final_rmse, sync_dist=True)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.ema.update_parameters(self.operator)
        every = self.hparams.grid_every_n_steps
        step = self.trainer.global_step
        if every and step % every == 0 and self.trainer.is_global_zero:
            self.save_grid(step)

    def on_train_end(self) -> None:
        every, step = self.hparams.grid_every_n_steps, self.trainer.global_step
        if every and step % every and self.trainer.is_global_zero:  # the final weights' grid, if not saved
            self.save_grid(step)

    @torch.no_grad()
    def sample(self, seeds: list[int], labels: Tensor | None = None, ema: bool = True) -> Tensor:
        """Samples of ``seeds`` (per-seed noise, as ``sample.py sampler=dsno`` draws it): one evaluation."""
        operator = self.ema.module if ema else self.operator
        noise = SeedNoise(seeds).randn(self.image_shape, device=self.device)
        return operator(noise * float(operator.sigmas[0]), labels)[:, -1]

    def save_grid(self, step: int) -> None:
        """A grid of the EMA operator's samples of seeds 0..grid_seeds-1 (labels cycle when conditional)."""
        seeds = list(range(self.hparams.grid_seeds))
        labels = None
        if self.class_labels is not None:
            labels = labels_for(seeds, self.class_labels, (self.teacher or {}).get("num_classes"))
            labels = labels.to(self.device)
        images = to_uint8(self.sample(seeds, labels).float())
        image = grid(images, nrow=int(np.ceil(np.sqrt(len(seeds)))))
        directory = Path(self.trainer.default_root_dir) / "grids"
        save_png(image, directory / f"{self.hparams.mode}-step-{step:07d}.png")
        for logger in self.trainer.loggers:
            if hasattr(logger, "log_image"):  # W&B
                logger.log_image(key="train/samples", images=[image], step=step)
            elif hasattr(getattr(logger, "experiment", None), "add_image"):  # TensorBoard
                logger.experiment.add_image("train/samples", image, step, dataformats="HWC")

    def export(self, path: Any) -> Path:
        """Write the EMA operator as a DSNO bundle (``sampler=dsno sampler.path=<path>``)."""
        extra = {"global_step": int(self.trainer.global_step) if self._trainer is not None else None}
        extra.update(data_cost=self.data_cost, class_labels=self.class_labels)
        return export_operator(
            self.ema.module,
            path,
            net=self.hparams.net,
            mode=self.hparams.mode,
            teacher=self.teacher,
            extra=extra,
        )

    def configure_optimizers(self) -> Any:
        """Adam, with a linear learning-rate warm-up over ``warmup_steps``."""
        hp = self.hparams
        return configure_optimizers(
            self,
            self.operator.parameters(),
            lr=hp.lr,
            weight_decay=hp.weight_decay,
            warmup_steps=hp.warmup_steps,
        )
