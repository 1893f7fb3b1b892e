"""Progress where a user waits, and quiet third-party output.

- training: one bar in optimizer steps up to ``max_steps`` (Lightning's own reads "Epoch 0/-2" with
  ``max_epochs=-1``), log lines with step, ETA and losses;
- feature passes: one bar per stage in images with a total, also across the resumable parts of
  reference statistics (``mode=ref`` showed one restarting bar per part, without a total), and a
  sampling bar labelled as sampling;
- the mixture fit and the sampling job: bars and log lines (``<run>/*.log``);
- Lightning's tips / hardware lines and W&B's ``anonymous`` warning filtered, nothing else.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fastsample.lit.callbacks import StepProgressBar, make_trainer
from fastsample.metrics import ModuleFeatures, resumable
from fastsample.metrics.evaluator import Evaluator
from fastsample.samplers import Sampler
from fastsample.utils import quiet

ROOT = Path(__file__).resolve().parents[1]


class Regression(pl.LightningModule):
    """The smallest trainable module: 12 rows in batches of 4, so 3 steps an epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.layer(batch[0]).pow(2).mean()
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.randn(12, 2, generator=torch.Generator().manual_seed(0))), 4)


def fit(tmp_path: Path, **settings) -> pl.Trainer:
    defaults = {"accelerator": "cpu", "max_epochs": -1, "logger": False, "enable_checkpointing": False}
    trainer = make_trainer(
        **{**defaults, **settings}, enable_model_summary=False, default_root_dir=str(tmp_path)
    )
    trainer.fit(Regression())
    return trainer


# --------------------------------------------------------------------------------------------------
# Training


def test_training_bar_counts_steps_to_max_steps_across_epochs(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fastsample.lit.callbacks")
    trainer = fit(tmp_path, max_steps=7)  # 3 epochs of 3 steps, stopped at 7
    bar = trainer.progress_bar_callback
    assert isinstance(bar, StepProgressBar)
    assert bar.train_progress_bar.total == 7 and bar.train_progress_bar.n == 7
    assert bar.train_progress_bar.desc.startswith("training steps")  # not "Epoch 2/-2"
    messages = [record.getMessage() for record in caplog.records if record.name == "fastsample.lit.callbacks"]
    assert messages[0] == "training to step 7 (from step 0)"
    assert messages[-1].startswith("step 7/7, 0:00:") and "ETA 0:00:00" in messages[-1]
    assert "train/loss" in messages[-1]
    assert sum(message.startswith("step 7/7") for message in messages) == 1  # logged once


def test_configured_trainer_gets_the_step_bar_unless_bars_are_off(tmp_path):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["trainer=cpu", f"hydra.run.dir={tmp_path}"])
    assert cfg.trainer._target_ == "fastsample.lit.callbacks.make_trainer"
    assert isinstance(make_trainer(max_steps=3).progress_bar_callback, StepProgressBar)
    assert make_trainer(max_steps=3, enable_progress_bar=False).progress_bar_callback is None
    own = pl.callbacks.TQDMProgressBar()
    assert make_trainer(max_steps=3, callbacks=[own]).progress_bar_callback is own
    # without max_steps the total is epochs x steps per epoch
    trainer = fit(tmp_path, max_steps=-1, max_epochs=2)
    assert trainer.progress_bar_callback.train_progress_bar.total == 6


# --------------------------------------------------------------------------------------------------
# Feature passes, mixture fit, sampling


class FlatFeatures(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.flatten(1)[:, :4], x.flatten(1)[:, :3]


class BarRecorder:
    """Wraps ``Evaluator._bar``: records (total, description) and keeps the bars."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.bars: list = []
        original = Evaluator._bar

        def recording(evaluator: Evaluator, total: int | None, desc: str):
            bar = original(evaluator, total, desc)
            self.bars.append(bar)
            return bar

        monkeypatch.setattr(Evaluator, "_bar", recording)


def test_reference_statistics_in_parts_show_one_bar_with_a_total(tmp_path, monkeypatch):
    monkeypatch.setattr(resumable, "PART_IMAGES", 40)  # 120 images: 3 parts
    recorder = BarRecorder(monkeypatch)
    evaluator = Evaluator(ModuleFeatures(FlatFeatures()), scores=("fid",), batch_size=20, progress=True)
    images = torch.rand(120, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    evaluator.build_reference(images, path=tmp_path / "ref.npz")
    assert [(bar.total, bar.n) for bar in recorder.bars] == [(120, 120)]
    assert recorder.bars[0].desc.startswith("features of reference images")


def test_sampling_bar_is_labelled_sampling_and_counts_images(monkeypatch, tiny_net_factory):
    recorder = BarRecorder(monkeypatch)
    evaluator = Evaluator(ModuleFeatures(FlatFeatures()), scores=("fid",), batch_size=4, progress=True)
    evaluator.reference = evaluator.build_reference(torch.rand(30, 1, 8, 8) * 2 - 1)
    recorder.bars.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 10 samples: the small-sample warnings are expected
        evaluator.score_sampler(tiny_net_factory(), Sampler("euler", 2), list(range(10)), shape=(1, 8, 8))
    assert [(bar.total, bar.n) for bar in recorder.bars] == [(10, 10)]
    assert recorder.bars[0].desc == "sampling euler + features"


def test_mixture_fit_logs_once_then_loads_from_the_cache(tmp_path, caplog):
    pytest.importorskip("sklearn")
    from fastsample.data import ImageDataModule
    from fastsample.models.gmm import fit_from_datamodule

    caplog.set_level(logging.INFO, logger="fastsample.models.gmm")
    first = fit_from_datamodule(ImageDataModule("digits"), rank=4, cache_dir=str(tmp_path))
    messages = [record.getMessage() for record in caplog.records]
    assert messages[0].startswith("fitting a Gaussian mixture (once; cached at")
    assert messages[1].startswith("fitted 10 components of rank 4 to 1438 images in")
    caplog.clear()
    again = fit_from_datamodule(ImageDataModule("digits"), rank=4, cache_dir=str(tmp_path))
    assert not caplog.records and torch.equal(first.means, again.means)


def test_sampling_job_writes_log_lines(tmp_path, caplog):
    from fastsample.jobs.sampling import generate

    caplog.set_level(logging.INFO, logger="fastsample.jobs.sampling")
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "sample", overrides=["model=gmm_toy", "seeds=0-5", "batch_size=4", f"output_dir={tmp_path}"]
        )
    generate(cfg)
    messages = [record.getMessage() for record in caplog.records]
    assert messages[0] == f"sampling 6 seeds with dpmpp_2m (NFE 10) in 2 batches -> {tmp_path}"
    assert messages[1].startswith("6 samples generated in")
    with np.load(tmp_path / "samples.npz") as data:
        assert len(data["seeds"]) == 6


# --------------------------------------------------------------------------------------------------
# Quiet third-party output


def test_lightning_tips_and_known_warnings_are_filtered_nothing_else():
    quiet.quiet_third_party()
    quiet.quiet_third_party()  # idempotent: one filter
    logger = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    assert sum(isinstance(item, quiet.DropMessages) for item in logger.filters) == 1

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord(logger.name, logging.INFO, __file__, 1, message, None, None)

    assert not logger.filter(record("💡 Tip: For seamless cloud logging, try installing [litlogger]"))
    assert not logger.filter(record("TPU available: False, using: 0 TPU cores"))
    assert logger.filter(record("GPU available: True (cuda), used: True"))
    assert logger.filter(record("`Trainer.fit` stopped: `max_steps=30` reached."))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        quiet.quiet_third_party()
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated", FutureWarning, stacklevel=1)
        warnings.warn("covariance of the samples is singular", UserWarning, stacklevel=1)
    assert [str(item.message) for item in caught] == ["covariance of the samples is singular"]


def test_wandb_anonymous_warning_is_not_printed(capsys, monkeypatch):
    term = pytest.importorskip("wandb.errors.term")
    monkeypatch.setattr(term, "_printed_messages", set())
    monkeypatch.setattr(term, "_silent", False)  # an earlier W&B run in this process may have silenced it
    monkeypatch.setattr(term, "_show_warnings", True)
    quiet.quiet_wandb()
    term.termwarn(
        "The anonymous setting has no effect and will be removed in a future version.", repeat=False
    )
    term.termwarn("something else", repeat=False)
    err = capsys.readouterr().err
    assert "anonymous" not in err and "something else" in err


def test_verbose_turns_the_filters_off(monkeypatch):
    monkeypatch.setenv("FASTSAMPLE_VERBOSE", "1")
    assert quiet.verbose()
    monkeypatch.setenv("FASTSAMPLE_VERBOSE", "0")
    assert not quiet.verbose()


def test_resumed_training_bar_starts_at_its_step_and_logs_at_the_same_milestones(tmp_path, caplog):
    """A run resumed at step 5 of 20: the bar starts at 5 and the log lines come at 6, 8, ... as before."""
    first = fit(tmp_path, max_steps=5)
    checkpoint = tmp_path / "five.ckpt"
    first.save_checkpoint(checkpoint)
    caplog.set_level(logging.INFO, logger="fastsample.lit.callbacks")
    trainer = make_trainer(
        accelerator="cpu", max_epochs=-1, max_steps=20, logger=False, enable_checkpointing=False,
        enable_model_summary=False, default_root_dir=str(tmp_path),
    )  # fmt: skip
    trainer.fit(Regression(), ckpt_path=str(checkpoint))
    bar = trainer.progress_bar_callback.train_progress_bar
    assert (bar.initial, bar.n, bar.total) == (5, 20, 20)
    messages = [record.getMessage() for record in caplog.records if record.name == "fastsample.lit.callbacks"]
    assert messages[0] == "training to step 20 (from step 5)"
    logged = [int(message.split()[1].split("/")[0]) for message in messages[1:]]
    assert logged == [6, 8, 10, 12, 14, 16, 18, 20]  # every 10% of the run, not from the resumed step
