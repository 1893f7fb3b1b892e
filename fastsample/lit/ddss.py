"""DDSS (Watson et al., ICLR 2022): learn a K-step GGDM sampler for a frozen backbone by minimizing KID.

Each training step draws the batch's noise from per-seed streams (fixed-noise reparametrization: the
sample is a deterministic, differentiable function of the sampler's parameters given the seeds), unrolls
the :class:`~fastsample.samplers.ggdm.GGDMSampler` with every network call checkpointed (gradient
rematerialization), and minimizes the unbiased MMD^2 with the cubic kernel (KID,
:func:`fastsample.metrics.mmd2_unbiased`) between features of the samples and of a real batch. The
backbone and the feature networks are frozen; only the sampler's parameters are trained.

Held-out evaluation: fixed seeds (far from the training seeds) are sampled, rounded to uint8 as
``sample.py`` saves them, and scored by :class:`fastsample.evaluation.Evaluator` with a *different*
feature network than the optimized one (``val/fid``, ``val/kid``), so the reported score is not the
one being gamed; the optimized network's KID is logged beside it (``val/kid_optimized``), and an
analytic backbone's exact log-likelihood of the samples (``val/loglik``, nats per dimension). The
scores of the initial sampler (DDIM) are logged once as ``init/...``.

``train.py task=ddss`` writes the learned sampler to ``<output_dir>/ggdm.pt``;
``sample.py sampler=ggdm sampler.path=<that file>`` uses it.

The plain pieces (:func:`ddss_loss`, :func:`image_features`, :class:`RandomConvFeatures`) work without
Lightning (``bench/ddss_gmm.py`` uses them).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from fastsample.metrics import CleanFIDInception, FeatureExtractor, ModuleFeatures, mmd2_unbiased
from fastsample.samplers.ggdm import GGDMSampler
from fastsample.utils.errors import check_range, fail
from fastsample.utils.instantiation import instantiate
from fastsample.utils.seeding import SeedNoise

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Plain pieces: differentiable features and a fixed random feature map


def image_features(extractor: FeatureExtractor, samples: Tensor) -> Tensor:
    """Features of float samples in [-1, 1] (``(N, C, H, W)`` or any data shape), differentiable.

    The same network as ``extractor(images)`` but without its uint8 rounding (which has no gradient):
    samples are clamped to [-1, 1] (what saving them does), mapped to the extractor's input range and
    embedded. clean-fid's Inception resizes with PIL outside the network and cannot be used here.
    """
    if isinstance(extractor, CleanFIDInception) and extractor.mode == "clean":
        fail(
            "the DDSS loss needs a differentiable feature network; clean-fid's Inception resizes with PIL. "
            "Use metrics mode=legacy_tensorflow, a classifier (metrics=classifier) or a module"
        )
    low, high = extractor.input_range
    x = samples.clamp(-1.0, 1.0)
    x = (x + 1.0) * ((high - low) / 2.0) + low
    if extractor.channels == 3 and x.ndim == 4 and x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    parameter = next(extractor.parameters(), None)
    if parameter is not None:
        x = x.to(parameter.dtype)
    features, _ = extractor.embed(x)
    return features.flatten(1)


class RandomConvFeatures(nn.Module):
    """A fixed, seeded random CNN: ``(N, C, H, W) -> (N, 2 * width * grid^2)`` features.

    Three 3x3 convolutions (the last two with stride 2) with tanh, average-pooled to a ``grid x grid``
    map. Random convolutional features keep spatial structure and need no training, which makes them a
    cheap feature map that no model was tuned on (held-out evaluation of DDSS, analytic mixtures).
    Weights come from their own generator, so the network is the same for a seed on any machine.
    """

    def __init__(self, in_channels: int = 1, width: int = 32, grid: int = 4, seed: int = 0) -> None:
        super().__init__()
        check_range("features.width", width, low=1)
        check_range("features.grid", grid, low=1)
        self.layers = nn.ModuleList(
            [
                nn.Conv2d(in_channels, width, 3, padding=1),
                nn.Conv2d(width, width, 3, stride=2, padding=1),
                nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            ]
        )
        self.grid = grid
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in self.layers:
                fan_in = layer.weight[0].numel()
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) / fan_in**0.5)
                layer.bias.copy_(0.1 * torch.randn(layer.bias.shape, generator=generator))
        self.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return nn.functional.adaptive_avg_pool2d(x, self.grid).flatten(1)


def ddss_loss(
    sampler: GGDMSampler,
    backbone: Any,
    features: Callable[[Tensor], Tensor],
    real: Tensor,
    seeds: Sequence[int],
    *,
    shape: Sequence[int] | None = None,
    class_labels: Tensor | None = None,
    checkpoint: bool = True,
) -> Tensor:
    """The DDSS objective on one batch: KID (unbiased MMD^2, cubic kernel) between ``features`` of the
    sampler's samples for ``seeds`` and of ``real``; differentiable in the sampler's parameters.

    The noise (initial and per step) comes from the seeds' own streams, so a batch of seeds is a fixed
    set of noise draws and the sample a deterministic function of the parameters (reparametrization).
    """
    noise_source = SeedNoise(seeds)
    noise = noise_source.randn(tuple(shape or real.shape[1:]), dtype=real.dtype, device=real.device)
    cond = {"class_labels": class_labels.to(real.device)} if class_labels is not None else None
    with torch.enable_grad():
        samples = sampler.sample(
            backbone, noise, cond=cond, generator=noise_source, grad=True, checkpoint=checkpoint
        )
        fake = features(samples)
    with torch.no_grad():
        target = features(real)
    return mmd2_unbiased(fake.double(), target.double())


def random_conv_features(
    in_channels: int = 1, width: int = 32, grid: int = 4, seed: int = 0
) -> ModuleFeatures:
    """:class:`RandomConvFeatures` as a feature extractor (named ``random_conv<seed>:<weights hash>``)."""
    return ModuleFeatures(RandomConvFeatures(in_channels, width, grid, seed), label=f"random_conv{seed}")


def pixel_features() -> ModuleFeatures:
    """The identity feature map (flattened pixels), named ``pixels``."""
    return ModuleFeatures(nn.Flatten(), label="pixels")


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
            fail("task.loss_features is not set; give a feature extractor config (e.g. metrics=classifier)")
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
        from fastsample.sampling import generate_batch

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
        from fastsample.evaluation import Evaluator

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
        return torch.optim.Adam(self.sampler.parameters(), lr=self.hparams.lr)
