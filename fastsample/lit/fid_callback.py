"""FID during training: every N steps, sample fixed seeds with the EMA denoiser and log ``val/fid``.

The work is done by :class:`fastsample.metrics.evaluator.Evaluator` (streaming features, FID / KID) and
:func:`fastsample.samplers.generation.generate_batch` (per-seed noise), so the numbers are the ones
evaluate.py gives for the same seeds. It runs on global rank 0 only; the other ranks carry on until their next
collective and wait there, so keep ``num_samples`` modest (the logged value is a fixed-seed proxy,
not a 50k-sample FID).

Example (conf/callbacks/*.yaml)::

    fid:
      _target_: fastsample.lit.fid_callback.FIDCallback
      every_n_steps: 5000
      num_samples: 2000
      sampler: heun
      steps: 18
      extractor: {_target_: fastsample.lit.loading.classifier_features}
      reference: null          # null: built from the datamodule's test split at fit start
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from fastsample.lit.loading import classifier_features
from fastsample.metrics import FeatureExtractor
from fastsample.metrics.evaluator import Evaluator, read_reference, save_reference_file
from fastsample.metrics.features import eval_mode
from fastsample.samplers import Sampler
from fastsample.utils.errors import check_range, fail
from fastsample.utils.instantiation import instantiate


class FIDCallback(pl.Callback):
    """Log ``<prefix>/fid`` (and ``<prefix>/kid``) of ``num_samples`` fixed-seed EMA samples.

    Args:
        every_n_steps: evaluate when ``global_step`` is a multiple of this (<= 0: never).
        num_samples: samples per evaluation, seeds ``seed_offset .. seed_offset + num_samples - 1``.
        sampler, steps, sampler_kwargs: the sampler (a registered name) and its settings.
        extractor: a :class:`FeatureExtractor`, or its config (``_target_`` ...), built at fit start.
        reference: a reference ``.npz``; ``None`` builds one from the datamodule's ``split`` at fit start
            (saved to ``reference_out`` when given).
        kid: also log KID (the reference's raw features are kept for it).
        batch_size: images per sampling / feature batch.
        prefix: the metric's stage name.
    """

    def __init__(
        self,
        every_n_steps: int = 5000,
        num_samples: int = 1000,
        sampler: str = "heun",
        steps: int = 18,
        extractor: FeatureExtractor | Mapping | None = None,
        reference: str | os.PathLike | None = None,
        split: str = "test",
        reference_out: str | os.PathLike | None = None,
        kid: bool = True,
        kid_subset_size: int = 1000,
        batch_size: int = 250,
        seed_offset: int = 0,
        prefix: str = "val",
        sampler_kwargs: Mapping | None = None,
    ) -> None:
        check_range("callbacks.fid.num_samples", num_samples, low=2)
        check_range("callbacks.fid.batch_size", batch_size, low=1)
        self.every_n_steps, self.num_samples, self.batch_size = every_n_steps, num_samples, batch_size
        self.sampler = Sampler(sampler, steps, **dict(sampler_kwargs or {}))
        self.extractor_config = extractor
        self.reference_path, self.split, self.reference_out = reference, split, reference_out
        self.kid, self.kid_subset_size, self.prefix = kid, kid_subset_size, prefix
        self.seeds = list(range(seed_offset, seed_offset + num_samples))
        self.evaluator: Evaluator | None = None
        self._last_step = -1

    # -- setup -------------------------------------------------------------------------------------
    def _extractor(self) -> FeatureExtractor:
        config = self.extractor_config
        if isinstance(config, FeatureExtractor):
            return config
        if config is None:
            return classifier_features()
        extractor = instantiate(config)
        if not isinstance(extractor, FeatureExtractor):
            fail(f"callbacks.fid.extractor built a {type(extractor).__name__}, not a feature extractor")
        return extractor

    def setup_evaluator(self, trainer: Any, module: Any) -> Evaluator:
        """The evaluator on the module's device, with the reference loaded or built from the data."""
        scores = ["fid", "kid"] if self.kid else ["fid"]
        evaluator = Evaluator(
            self._extractor(),
            scores=scores,
            batch_size=self.batch_size,
            keep_features=self.num_samples if self.kid else 0,
            keep_logits=0,
            kid_subset_size=self.kid_subset_size,
            device=module.device,
        )
        if self.reference_path:
            evaluator.reference = read_reference(self.reference_path)
            return evaluator
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None or not callable(getattr(datamodule, "dataset", None)):
            fail(
                "FIDCallback needs reference statistics: set callbacks.fid.reference=<.npz> "
                "or train with a datamodule"
            )
        ref = evaluator.build_reference(
            datamodule, split=self.split, dataset=getattr(datamodule, "name", None)
        )
        if self.reference_out:
            ref = save_reference_file(Path(self.reference_out), ref)
        evaluator.reference = ref
        return evaluator

    def on_fit_start(self, trainer: Any, module: Any) -> None:
        if trainer.is_global_zero and self.every_n_steps > 0:
            self.evaluator = self.setup_evaluator(trainer, module)

    # -- evaluation --------------------------------------------------------------------------------
    @torch.no_grad()
    def compute(self, module: Any) -> dict[str, float]:
        """Scores of the module's EMA samples for the fixed seeds (class labels cycle when conditional)."""
        if self.evaluator is None:
            fail("FIDCallback.compute called before on_fit_start built the evaluator")
        denoiser = module.denoiser(ema=True)
        labels = None
        if module.num_classes:
            labels = torch.tensor([seed % module.num_classes for seed in self.seeds])
        with eval_mode(denoiser):
            return self.evaluator.score_sampler(
                denoiser,
                self.sampler,
                self.seeds,
                self.batch_size,
                shape=module.image_shape,
                class_labels=labels,
                device=module.device,
            )

    def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        # Step 0 is the untrained model; with gradient accumulation several batches share one step.
        if (
            self.every_n_steps <= 0
            or step == 0
            or step % self.every_n_steps
            or step == self._last_step
            or not trainer.is_global_zero
        ):
            return
        self._last_step = step
        scores = self.compute(module)
        metrics = {f"{self.prefix}/fid": float(scores["fid"])}
        if scores.get("kid_mean") is not None:
            metrics[f"{self.prefix}/kid"] = float(scores["kid_mean"])
        # Straight to the loggers: a step log would wait for log_every_n_steps, and an expensive,
        # rare metric must not be dropped. module.log (logger=False) makes it a callback metric
        # (ModelCheckpoint / early stopping on rank 0, the progress bar); rank 0 only, hence no sync.
        for logger in getattr(trainer, "loggers", []):
            logger.log_metrics(metrics, step=step)
        for name, value in metrics.items():
            module.log(
                name, value, logger=False, prog_bar=True, rank_zero_only=True, on_step=True, on_epoch=False
            )
