"""DDSS (Watson et al., ICLR 2022): learn a K-step GGDM sampler for a frozen backbone by minimizing KID.

Each training step draws the batch's noise from per-seed streams (fixed-noise reparametrization: the
sample is a deterministic, differentiable function of the sampler's parameters given the seeds), unrolls
the :class:`~fastsample.samplers.ggdm.GGDMSampler` with every network call checkpointed (gradient
rematerialization), and minimizes the unbiased MMD^2 with the cubic kernel (KID,
:func:`fastsample.metrics.mmd2_unbiased`) between features of the samples and of a real batch. The
backbone and the feature networks are frozen; only the sampler's parameters are trained.

Held-out evaluation: fixed seeds (far from the training seeds) are sampled, rounded to uint8 as
``sample.py`` saves them, and scored by :class:`fastsample.metrics.evaluator.Evaluator` with a *different*
feature network than the optimized one (``val/fid``, ``val/kid``), so the reported score is not the
one being gamed; the optimized network's KID is logged beside it (``val/kid_optimized``), and an
analytic backbone's exact log-likelihood of the samples (``val/loglik``, nats per dimension). The
scores of the initial sampler (DDIM) are logged once as ``init/...``.

``train.py task=ddss`` writes the learned sampler to ``<output_dir>/ggdm.pt``;
``sample.py sampler=ggdm sampler.path=<that file>`` uses it.

The plain pieces (:func:`~fastsample.metrics.feature_loss.ddss_loss`,
:func:`~fastsample.metrics.feature_loss.image_features`, the feature networks) live in
:mod:`fastsample.metrics.feature_loss` and work without Lightning (``bench/ddss_gmm.py`` uses them).
"""

from __future__ import annotations

import logging
import time
from functools import partial
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from fastsample.lit.optim import configure_optimizers
from fastsample.metrics import FeatureExtractor
from fastsample.metrics.evaluator import Evaluator
from fastsample.metrics.feature_loss import ddss_loss, image_features
from fastsample.samplers.generation import generate_batch
from fastsample.samplers.ggdm import GGDMSampler
from fastsample.utils.errors import check_range, fail
from fastsample.utils.instantiation import instantiate

log = logging.getLogger(__name__)


def _container(node: Any) -> Any:
    """A config node as plain containers (resolved), so hyper-parameters pickle into checkpoints."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def _build(config: Any) -> Any:
    if isinstance(config, (DictConfig, dict)):
        return instantiate(config)
    return config


def _backbone(config: Any) -> nn.Module:
    backbone = _build(config)
    if not isinstance(backbone, nn.Module):
        fail(f"task.model built a {type(backbone).__name__}, not a denoiser (use a conf/model config)")
    return backbone.eval().requires_grad_(False)


def _extractor(config: Any, setting: str) -> FeatureExtractor | None:
    extractor = None if config is None else _build(config)
    if extractor is not None and not isinstance(extractor, FeatureExtractor):
        fail(f"{setting} built a {type(extractor).__name__}, not a fastsample.metrics.FeatureExtractor")
    if extractor is not None:
        extractor.requires_grad_(False).eval()
    return extractor


# --------------------------------------------------------------------------------------------------
# The Lightning module


class DDSSModule(pl.LightningModule):
    """Trains a :class:`GGDMSampler` for the frozen backbone ``model`` (conf/task/ddss.yaml).

    Args:
        model: the backbone's config (a denoiser: ``model=gmm_*``, ``from_checkpoint``, an asset).
        steps: K, the sampler's steps (= NFE).
        schedule: the initial DDIM grid (``quadratic``, ``time_uniform``, ``karras``, ... or a dict).
        learn_pred, learn_time, learn_noise: +PRED, +TIME and learned noise scales.
        loss_features: the feature extractor whose KID is minimized (config or object).
        eval_features: the held-out extractor for ``val/fid`` / ``val/kid`` (``None``: no evaluation).
        lr: Adam's learning rate for the sampler's parameters.
        checkpoint: recompute each network call in the backward pass (memory ~ K * |x|).
        conditional: condition on the real batch's labels when the backbone is class-conditional.
        seed_offset: training batch ``n`` uses seeds ``seed_offset + n * B ...`` (then per process).
        eval_samples, eval_seed_offset, eval_batch_size: the held-out evaluation's fixed seeds.
        eval_reference: a reference ``.npz`` for the held-out extractor (``None``: built from the
            datamodule's test split at fit start, at most ``eval_reference_samples`` images).
        export_name: the learned sampler's file name in the run's output folder.
    """

    def __init__(
        self,
        model: Any,
        steps: int = 10,
        schedule: Any = "quadratic",
        learn_pred: bool = True,
        learn_time: bool = True,
        learn_noise: bool = True,
        loss_features: Any = None,
        eval_features: Any = None,
        lr: float = 5e-3,
        checkpoint: bool = True,
        conditional: bool = True,
        seed_offset: int = 0,
        eval_samples: int = 500,
        eval_seed_offset: int = 1_000_000_000,
        eval_batch_size: int = 250,
        eval_reference: str | None = None,
        eval_reference_samples: int = 10_000,
        export_name: str = "ggdm.pt",
    ) -> None:
        super().__init__()
        check_range("task.steps", steps, low=1)
        check_range("task.lr", lr, low=0, low_inclusive=False)
        check_range("task.eval_samples", eval_samples, low=0)
        check_range("task.eval_batch_size", eval_batch_size, low=1)
        if loss_features is None:
            fail("task.loss_features is not set; give a feature extractor config (e.g. features=classifier)")
        self.save_hyperparameters(ignore=["model", "loss_features", "eval_features", "schedule"])
        self.hparams.update(
            model=_container(model),
            schedule=_container(schedule),
            loss_features=_container(loss_features),
            eval_features=_container(eval_features),
        )
        self.backbone = _backbone(model)
        self.sampler = GGDMSampler.from_schedule(
            self.backbone,
            steps,
            _container(schedule),
            learn_pred=learn_pred,
            learn_time=learn_time,
            learn_noise=learn_noise,
        )
        self.loss_extractor = _extractor(loss_features, "task.loss_features")
        self.eval_extractor = _extractor(eval_features, "task.eval_features")
        self.image_shape = tuple(self.backbone.image_shape) if self.backbone.image_shape else None
        self.num_classes = getattr(self.backbone, "num_classes", None) if conditional else None
        self.evaluators: dict[str, Any] = {}
        self.init_scores: dict[str, float] = {}
        self.last_scores: dict[str, float] = {}
        self._fit_start = 0.0

    def train(self, mode: bool = True) -> DDSSModule:
        """Only the sampler has a training mode: the backbone and feature networks stay in eval mode."""
        super().train(mode)
        for frozen in (self.backbone, self.loss_extractor, self.eval_extractor):
            if frozen is not None:
                frozen.eval()
        return self

    # -- generation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, seeds: list[int], labels: Tensor | None) -> Tensor:
        """Samples of ``seeds`` with per-seed noise, exactly as ``sample.py`` draws them."""
        return generate_batch(self.sampler, self.backbone, seeds, self.image_shape, labels, None, self.device)

    def _labels(self, labels: Tensor | None) -> Tensor | None:
        if not self.num_classes or labels is None or bool((labels < 0).any()):
            return None
        return labels

    def training_seeds(self, batch_size: int) -> list[int]:
        """Fresh, reproducible seeds for this step and process."""
        start = (
            self.hparams.seed_offset
            + (self.global_step * self.trainer.world_size + self.global_rank) * batch_size
        )
        return list(range(start, start + batch_size))

    # -- Lightning hooks -------------------------------------------------------------------------------
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        loss = ddss_loss(
            self.sampler,
            self.backbone,
            partial(image_features, self.loss_extractor),
            images,
            self.training_seeds(len(images)),
            shape=self.image_shape,
            class_labels=self._labels(labels),
            checkpoint=self.hparams.checkpoint,
        )
        self.log("train/kid", loss, prog_bar=True, on_step=True, on_epoch=True, sync_dist=True)
        return loss.float()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        pass  # the held-out evaluation runs once per validation, in on_validation_epoch_end

    def on_fit_start(self) -> None:
        self._fit_start = time.perf_counter()
        if self.eval_extractor is None or not self.hparams.eval_samples or not self.trainer.is_global_zero:
            return
        self.evaluators = self.build_evaluators(getattr(self.trainer, "datamodule", None))
        self.init_scores = self.evaluate()
        metrics = {f"init/{name}": value for name, value in self.init_scores.items()}
        for logger in self.trainer.loggers:
            logger.log_metrics(metrics, step=0)
        log.info("DDSS: the initial sampler (DDIM) scores %s", metrics)

    def on_validation_epoch_end(self) -> None:
        if not self.evaluators or self.trainer.sanity_checking:
            return
        self.last_scores = self.evaluate()
        for name, value in self.last_scores.items():
            self.log(f"val/{name}", value, prog_bar=name == "fid", rank_zero_only=True)

    # -- held-out evaluation -------------------------------------------------------------------------
    def build_evaluators(self, datamodule: Any) -> dict[str, Any]:
        """Evaluators of the held-out extractor and (for ``kid_optimized``) of the optimized one."""
        hp = self.hparams
        evaluators = {}
        for key, extractor, reference in (
            ("held_out", self.eval_extractor, hp.eval_reference),
            ("optimized", self.loss_extractor, None),
        ):
            evaluator = Evaluator(
                extractor,
                scores=("fid", "kid"),
                batch_size=hp.eval_batch_size,
                keep_features=max(hp.eval_samples, 2),
                kid_subsets=10,
                device=self.device,
            )
            if reference is not None:
                evaluator.reference = reference
            else:
                evaluator.reference = evaluator.build_reference(
                    self._reference_images(datamodule),
                    split="test",
                    dataset=getattr(datamodule, "name", None),
                )
            evaluators[key] = evaluator
        return evaluators

    def _reference_images(self, datamodule: Any) -> Tensor:
        if datamodule is None or not callable(getattr(datamodule, "dataset", None)):
            fail("the DDSS evaluation needs task.eval_reference=<.npz> or a datamodule with a test split")
        dataset = datamodule.dataset("test")
        count = min(len(dataset), self.hparams.eval_reference_samples)
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:count]
        return torch.stack([dataset[int(i)][0] for i in order])

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Scores of the current sampler on the fixed evaluation seeds (rank 0)."""
        hp = self.hparams
        seeds = list(range(hp.eval_seed_offset, hp.eval_seed_offset + hp.eval_samples))
        labels = None
        if self.num_classes:
            labels = torch.tensor([seed % self.num_classes for seed in seeds])
        chunks = []
        for start in range(0, len(seeds), hp.eval_batch_size):
            chunk_labels = None if labels is None else labels[start : start + hp.eval_batch_size]
            chunks.append(self.generate(seeds[start : start + hp.eval_batch_size], chunk_labels))
        samples = torch.cat(chunks).float()
        held_out = self.evaluators["held_out"].score_images(samples, what="DDSS evaluation samples")
        optimized = self.evaluators["optimized"].score_images(samples, what="DDSS evaluation samples")
        scores = {"fid": held_out["fid"], "kid": held_out.get("kid_mean", float("nan"))}
        scores["fid_optimized"] = optimized["fid"]
        scores["kid_optimized"] = optimized.get("kid_mean", float("nan"))
        if callable(getattr(self.backbone, "log_prob", None)):
            dim = samples[0].numel()
            scores["loglik"] = float(self.backbone.log_prob(samples.double()).mean()) / dim
        return {name: float(value) for name, value in scores.items()}

    # -- export ----------------------------------------------------------------------------------------
    def export(self, path: Any) -> Path:
        """Write the learned sampler as ``<folder of path>/<export_name>`` (train.py passes model.pt)."""
        target = Path(path).with_name(self.hparams.export_name)
        self.sampler.save(
            target,
            loss_features=getattr(self.loss_extractor, "name", None),
            eval_features=getattr(self.eval_extractor, "name", None),
            train_steps=int(self.global_step),
            train_wall_s=round(time.perf_counter() - self._fit_start, 1) if self._fit_start else None,
            init_scores=self.init_scores,
            scores=self.last_scores,
        )
        log.info("DDSS: learned sampler written to %s", target)
        return target

    def configure_optimizers(self) -> Any:
        """Adam over the sampler's parameters (the backbone and feature networks are frozen)."""
        return configure_optimizers(self, self.sampler.parameters(), lr=self.hparams.lr)
