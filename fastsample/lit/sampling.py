"""Distributed sampling and evaluation through Lightning: ``sample.py trainer=ddp_cpu`` / ``trainer=ddp``.

The seeds are cut into the same batches as a single-process run; each process (rank) takes a
contiguous block of batches (:class:`BlockSampler`: no padding, no duplicates) and runs them in
:class:`SeedBatchModule`'s ``predict_step``. Noise comes from per-seed generators
(:class:`~fastsample.utils.seeding.SeedNoise`), so a batch is the same computation whatever rank
runs it: the outputs do not depend on the process count.

- ``sample.py``: every rank writes the shards of its batches (``shards/seeds-A-B.npz``, the same files
  a single process writes); after a barrier rank 0 streams them into ``samples.npz`` and writes
  ``grid.png`` and ``run.json``. Shards already on disk are skipped, so a rerun resumes as before.
- ``evaluate.py mode=generate``: every rank folds its images' features into a
  :class:`~fastsample.metrics.FeatureStats`; the accumulators are gathered and merged in rank order
  (:func:`~fastsample.metrics.stats.gather_stats`), which with contiguous blocks keeps the raw
  feature rows (KID, precision / recall, IS) in seed order, as a single process keeps them.

Contiguous blocks rather than Lightning's round-robin ``UnrepeatedDistributedSampler`` are what
makes that order come out right. The single-process path (no ``trainer``) does not use this module.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from omegaconf import DictConfig
from pytorch_lightning.strategies.launchers import _MultiProcessingLauncher, _SubprocessScriptLauncher
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from fastsample.lit.tracking import sweep_group
from fastsample.utils.errors import fail
from fastsample.utils.instantiation import instantiate

Work = Callable[[list[int], torch.device], Any]


class SeedBatches(Dataset):
    """Item ``i`` is ``batches[i]``: one batch of seeds, the unit of work and of output files."""

    def __init__(self, batches: Sequence[Sequence[int]]) -> None:
        self.batches = [list(batch) for batch in batches]

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> list[int]:
        return self.batches[index]


def rank_block(count: int, rank: int, world_size: int) -> range:
    """The contiguous block of ``range(count)`` that ``rank`` of ``world_size`` takes (sizes differ <= 1)."""
    base, extra = divmod(count, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


class BlockSampler(Sampler[int]):
    """Indices of one rank's contiguous block: every index once over all ranks, in order."""

    def __init__(self, count: int, rank: int, world_size: int) -> None:
        self.indices = rank_block(count, rank, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def all_gather(payload: Any) -> list[Any]:
    """Every rank's ``payload``, in rank order (just ``[payload]`` without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [payload]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, payload)
    return gathered


class SeedBatchModule(pl.LightningModule):
    """Runs ``work(seeds, device)`` on this rank's block of seed batches, then gathers.

    Args:
        model: the denoiser; registered as a submodule so Lightning moves it to the rank's device.
        batches: all batches of seeds (every rank gets the same list).
        work: what one batch does (generate and save a shard, or generate and extract features).
        start: called on every rank once the device is known, before the first batch.
        payload: called on every rank after its last batch; the values of all ranks end up in
            :attr:`gathered` (rank order) on every rank.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        batches: Sequence[Sequence[int]],
        work: Work,
        start: Callable[[SeedBatchModule], None] | None = None,
        payload: Callable[[], Any] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.batches = [list(batch) for batch in batches]
        self.work, self.start, self.payload = work, start, payload
        self.elapsed = 0.0
        self.gathered: list[dict[str, Any]] = []

    def predict_dataloader(self) -> DataLoader:
        sampler = BlockSampler(len(self.batches), self.global_rank, self.trainer.world_size)
        return DataLoader(SeedBatches(self.batches), batch_size=None, sampler=sampler)

    def on_predict_start(self) -> None:
        if self.start is not None:
            self.start(self)
        self.trainer.strategy.barrier("seed-batches-start")  # rank 0's setup (run state) comes first
        self._started = time.perf_counter()
        # Lightning's bars are off (they count batches per rank); rank 0 shows its images, with an ETA
        # that holds for all ranks (their blocks differ by at most one batch).
        mine = rank_block(len(self.batches), self.global_rank, self.trainer.world_size)
        self._bar = tqdm(
            total=sum(len(self.batches[index]) for index in mine),
            desc=f"sampling (rank 0 of {self.trainer.world_size})",
            unit="img",
            leave=False,
            disable=self.global_rank != 0,
        )

    def predict_step(self, batch: list[int], batch_idx: int) -> int:
        seeds = [int(seed) for seed in batch]
        with torch.no_grad():
            self.work(seeds, self.device)
        self._bar.update(len(seeds))
        return len(seeds)  # outputs go to files / accumulators; Lightning warns about None

    def on_predict_epoch_end(self) -> None:
        self._bar.close()
        self.elapsed = time.perf_counter() - self._started
        mine = {
            "rank": self.global_rank,
            "elapsed_s": self.elapsed,
            "batches": len(rank_block(len(self.batches), self.global_rank, self.trainer.world_size)),
            "device": str(self.device),  # Lightning's teardown moves the module back to the CPU
            "payload": None if self.payload is None else self.payload(),
        }
        self.gathered = all_gather(mine)  # also a barrier: every rank's batches are done


def build_trainer(node: DictConfig) -> pl.Trainer:
    """A Lightning trainer for ``predict`` from a ``conf/trainer`` config.

    Fixed for sampling: no logger / checkpoints / progress bar, our own sampler (contiguous blocks),
    gradients allowed (guidance differentiates the classifier; ``predict_step`` turns them off
    itself), and full precision: the network's precision is ``network_precision``, applied around the
    network call only, while a ``bf16-mixed`` trainer would lower the solver's arithmetic too.
    """
    trainer = instantiate(
        node,
        logger=False,
        callbacks=[],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        inference_mode=False,
        precision="32-true",
    )
    check_launcher(trainer)
    return trainer


def check_launcher(trainer: pl.Trainer) -> None:
    """Refuse, before any process starts, the launches that cannot run a sampling job.

    - ``ddp_spawn`` pickles the job into new processes, and the job's closures do not pickle;
    - Lightning's script launcher inside a local Hydra multirun (``-m``) would rerun the command
      line, i.e. the whole sweep, in every child process. Under SLURM (one task per GPU, e.g.
      ``hydra/launcher=slurm``) or torchrun the processes exist already and nothing is relaunched.
    """
    launcher = trainer.strategy.launcher
    if isinstance(launcher, _MultiProcessingLauncher) and not launcher.is_interactive_compatible:
        fail(
            "trainer.strategy=ddp_spawn cannot hand a sampling job to new processes; use trainer.strategy=ddp"
        )
    relaunches = (
        isinstance(launcher, _SubprocessScriptLauncher)
        and launcher.num_processes > 1
        and not launcher.cluster_environment.creates_processes_externally
    )
    if relaunches and sweep_group() is not None:
        fail(
            "trainer with several processes inside a local multirun (-m): Lightning would rerun the whole "
            "sweep in each process; run the sweep with hydra/launcher=slurm (one task per GPU) or one "
            "distributed job at a time without -m"
        )
