"""Exact training resume: a run killed mid-epoch and resumed from its last checkpoint (``ckpt_path=last``)
ends with bitwise the weights, EMA and optimizer state of an uninterrupted run.

What makes it exact (docs/reliability.md): the data order of an epoch is a function of (seed, epoch)
and the loader reports its position in checkpoints (``fastsample.data.datamodule.ResumableLoader``),
augmentation is seeded per item, and ``fastsample.lit.resume.ResumeState`` keeps the random streams and
the EMA update that Lightning's hook order leaves out of a step-end checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir

from fastsample.data.datamodule import EpochShuffle, ResumableLoader, SeededItems
from fastsample.jobs.training import train

ROOT = Path(__file__).resolve().parents[1]
# 128 digits in batches of 32: 4 steps per epoch; 9 steps cross two epoch ends (with validation);
# a checkpoint every 3 steps (the resumed run must use the same checkpoint settings, as with make pretrain)
COMMON = [
    "dataset=digits",
    "dataset.subset=128",
    "dataset.val_subset=32",
    "dataset.batch_size=32",
    "dataset.hflip=true",
    "task=diffusion",
    "net@task.net=unet_tiny",
    "task.warmup_steps=3",
    "callbacks.sample_grid=null",
    "callbacks.lr_monitor=null",
    "logger=none",
    "trainer=cpu",
    "trainer.max_steps=9",
    "callbacks.model_checkpoint.every_n_train_steps=3",
    "trainer.limit_val_batches=1",
    "+trainer.enable_progress_bar=false",
]


class Killed(RuntimeError):
    """Stands for a SIGKILL: the run stops where it is."""


class Crash(pl.Callback):
    """Dies at the start of step ``at_step``, as a killed process would (nothing is saved on the way)."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_start(self, trainer: pl.Trainer, module, batch, batch_idx: int) -> None:
        if trainer.global_step == self.at_step:
            raise Killed(f"killed at step {self.at_step}")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FASTSAMPLE_DATA", str(tmp_path / "data"))


def run(out: Path, *overrides: str) -> None:
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[f"paths.output_dir={out}", f"paths.cache_dir={out / 'cache'}", *COMMON, *overrides],
        )
    train(cfg)


def final_state(out: Path) -> dict:
    checkpoint = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 9
    return checkpoint


def assert_same_tensors(first, second, where: str = "") -> None:
    if isinstance(first, torch.Tensor):
        assert torch.equal(first, second), f"{where} differs"
    elif isinstance(first, dict):
        assert first.keys() == second.keys(), where
        for key in first:
            assert_same_tensors(first[key], second[key], f"{where}.{key}")
    elif isinstance(first, (list, tuple)):
        assert len(first) == len(second), where
        for index, (a, b) in enumerate(zip(first, second)):
            assert_same_tensors(a, b, f"{where}[{index}]")
    else:
        assert first == second, f"{where}: {first!r} != {second!r}"


def test_killed_mid_epoch_run_resumes_to_the_same_weights(tmp_path: Path) -> None:
    run(tmp_path / "straight")
    # killed at the start of step 8 (epoch 1, batch 4 of 4): its last checkpoint is step 6, mid-epoch,
    # and step 7 is lost; the resumed run redoes it, crosses the epoch end and validates
    killed = tmp_path / "killed"
    with pytest.raises(Killed):
        run(killed, f"+callbacks.crash._target_={__name__}.Crash", "+callbacks.crash.at_step=7")
    assert torch.load(killed / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 6
    with pytest.warns() as caught:
        run(killed, "ckpt_path=last")
    assert not [w for w in caught if "not resumable" in str(w.message)]
    straight, resumed = final_state(tmp_path / "straight"), final_state(killed)
    assert_same_tensors(straight["state_dict"], resumed["state_dict"], "state_dict")  # net and EMA
    assert_same_tensors(straight["optimizer_states"], resumed["optimizer_states"], "optimizer")
    assert_same_tensors(straight["lr_schedulers"], resumed["lr_schedulers"], "lr_schedulers")


def test_loader_resumes_mid_epoch_without_loading_the_skipped_batches() -> None:
    loaded: list[int] = []

    class Recording(torch.utils.data.Dataset):
        hflip = True

        def __len__(self) -> int:
            return 10

        def __getitem__(self, index: int) -> torch.Tensor:
            loaded.append(index)
            return torch.tensor([index, float(torch.rand(()))])  # an item and its "augmentation"

    def loader() -> ResumableLoader:
        items = SeededItems(Recording(), seed=3)
        return ResumableLoader(items, batch_size=3, sampler=EpochShuffle(items, seed=3))

    straight = loader()
    straight.sampler.set_epoch(2)
    batches = list(straight)
    assert len(batches) == 4 and straight.state_dict() == {"epoch": 2, "batches": 4}
    partial = loader()
    partial.sampler.set_epoch(2)
    iterator = iter(partial)
    next(iterator), next(iterator)
    state = partial.state_dict()
    assert state == {"epoch": 2, "batches": 2}
    resumed = loader()
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(2)
    loaded.clear()
    rest = list(resumed)
    assert len(loaded) == 4  # only the last two batches' items were loaded
    for expected, got in zip(batches[2:], rest):
        assert torch.equal(expected, got)
    other = loader()
    other.sampler.set_epoch(3)
    assert not torch.equal(torch.cat(list(other)), torch.cat(batches))  # another epoch, another order
