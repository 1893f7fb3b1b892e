"""LightningDataModules over the dataset builders: images by name, and toy point clouds.

``dataset.batch_size`` is the *global* batch: each device loads ``batch_size / world_size`` items,
so a run's effective batch (and hence its learning-rate tuning) does not change with the number of
GPUs. The validation and test loaders both read the ``test`` split (the data sets here have no
separate validation split); ``val_subset`` trims it for quick runs.

Training data is resumable, so a killed run resumed from a mid-epoch checkpoint sees exactly the
batches an uninterrupted run sees (``docs/reliability.md``):

- the order of epoch ``e`` is a permutation drawn from ``seed + e`` (:class:`EpochShuffle`, a
  ``DistributedSampler`` that Lightning leaves in place and calls ``set_epoch`` on), not from a
  generator whose state depends on the earlier epochs;
- an item's augmentation (``hflip``) draws from a generator seeded by (seed, epoch, item)
  (:class:`SeededItems`), whichever worker loads it, and never from the training's random stream;
- :class:`ResumableLoader` reports the batches it has yielded in the current epoch (Lightning stores
  ``state_dict()`` in every checkpoint) and, resumed, starts that epoch after them without loading them.

The validation / test loaders draw their worker seed from their own generator, so validating does not
advance the training's random stream either.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from fastsample.data.datasets import IMAGE_DATASETS, build_dataset, image_folder_classes
from fastsample.data.toy import ToyDataset, ToySampler
from fastsample.utils.errors import DISK_FULL_ERRNOS, UserError, brief, check_choice, check_range, fail


def per_device_batch_size(global_batch: int, world_size: int) -> int:
    """Split ``global_batch`` evenly over ``world_size`` devices, or fail naming the setting."""
    check_range("dataset.batch_size", global_batch, low=1)
    if global_batch % world_size:
        fail(
            f"dataset.batch_size={global_batch} does not divide across {world_size} devices; "
            f"use a multiple of {world_size}"
        )
    return global_batch // world_size


def mix_seed(*values: int) -> int:
    """One 63-bit generator seed from several integers (the same numbers give the same seed)."""
    seed = 0
    for value in values:
        seed = (seed * 1_000_003 + int(value) + 1) % (2**63 - 1)
    return seed


class EpochShuffle(DistributedSampler):
    """The epoch's permutation from ``seed + epoch`` (``DistributedSampler``'s rule, sharded over
    ``num_replicas`` ranks), yielded as ``epoch * len(dataset) + item`` so :class:`SeededItems` knows
    the epoch of every item. ``start`` drops the first items of the next iteration (a resumed epoch)."""

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        size, start, self.start = len(self.dataset), self.start, 0
        indices = list(super().__iter__())[start:]
        return iter([self.epoch * size + index for index in indices])


class SeededItems(Dataset):
    """``dataset`` indexed by :class:`EpochShuffle`'s keys: item ``k`` of epoch ``e`` is loaded with the
    CPU random stream seeded by (seed, e, k), so random augmentation is the same whichever worker or
    run loads it, and the caller's random stream is left as it was."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed
        # data sets that declare no random augmentation (hflip=false) need no seeding
        self.random = bool(getattr(dataset, "hflip", True))

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: int) -> Any:
        epoch, index = divmod(int(key), len(self))
        if not self.random:
            return self.dataset[index]
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(mix_seed(self.seed, epoch, index))
            return self.dataset[index]


class ResumableLoader(DataLoader):
    """A DataLoader with Lightning's stateful-loader interface: ``state_dict()`` is the epoch and the
    batches yielded in it; after ``load_state_dict()`` the next iteration of that epoch starts after
    those batches (the sampler skips their items, so they are not loaded)."""

    def __init__(self, dataset: Dataset, **settings: Any) -> None:
        super().__init__(dataset, **settings)
        self._epoch, self._position, self._resume = 0, 0, None

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches": self._position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume = (int(state["epoch"]), int(state["batches"]))

    def __iter__(self) -> Iterator[Any]:
        epoch = int(getattr(self.sampler, "epoch", 0))
        resume, self._resume = self._resume, None
        skip = resume[1] if resume is not None and resume[0] == epoch else 0
        if skip and isinstance(self.sampler, EpochShuffle):
            self.sampler.start = skip * int(self.batch_size or 1)
        self._epoch, self._position = epoch, skip
        for batch in super().__iter__():
            self._position += 1
            yield batch


def download_reason(error: BaseException) -> str:
    """Why a download failed, in one line: the innermost cause; torchvision lists the mirrors' errors
    after its first line ("Error downloading x.gz:"), so the last of them is the reason."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1]}" if len(lines) > 1 else brief(error)


def find_disk_full(error: BaseException | None) -> bool:
    """Whether a full disk (or quota) is in ``error``'s chain: the entry point reports that itself."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
            return True
        error = error.__cause__ or error.__context__
    return False


class SplitDataModule(pl.LightningDataModule):
    """Shared loader logic: builds each split once, on demand; subclasses implement :meth:`build`."""

    def __init__(self, batch_size: int, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        check_range("dataset.batch_size", batch_size, low=1)
        check_range("dataset.num_workers", num_workers, low=0)
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self._datasets: dict[str, Dataset] = {}

    def build(self, split: str) -> Dataset:
        """Build the data set of ``split`` ('train' or 'test')."""
        raise NotImplementedError

    def dataset(self, split: str) -> Dataset:
        """The (cached) data set of ``split``."""
        if split not in self._datasets:
            self._datasets[split] = self.build(split)
        return self._datasets[split]

    @property
    def world_size(self) -> int:
        """Number of devices of the attached trainer (1 when used without one)."""
        return self.trainer.world_size if self.trainer is not None else 1

    @property
    def device_batch_size(self) -> int:
        """Per-device batch size; fails early when the global batch does not divide evenly."""
        return per_device_batch_size(self.batch_size, self.world_size)

    def setup(self, stage: str | None = None) -> None:
        """Check the batch split and build the splits ``stage`` needs (both when ``stage`` is None)."""
        _ = self.device_batch_size
        if stage in (None, "fit"):
            self.dataset("train")
        self.dataset("test")

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        # Its own generator: the worker seed a DataLoader draws per iteration must not come from (and
        # advance) the global stream the training draws its noise from.
        settings = {
            "batch_size": self.device_batch_size,
            "num_workers": self.num_workers,
            "generator": torch.Generator().manual_seed(self.seed),
            "persistent_workers": self.num_workers > 0,
            "pin_memory": torch.cuda.is_available(),
        }
        if not shuffle:
            return DataLoader(self.dataset(split), shuffle=False, **settings)
        items = SeededItems(self.dataset(split), self.seed)
        trainer = self.trainer
        ranks = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = EpochShuffle(items, num_replicas=ranks[0], rank=ranks[1], seed=self.seed)
        return ResumableLoader(items, sampler=sampler, **settings)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches, resumable mid-epoch (:class:`ResumableLoader`)."""
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches (the ``test`` split, in order)."""
        return self._loader("test", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches (the ``test`` split, in order)."""
        return self._loader("test", shuffle=False)


class ImageDataModule(SplitDataModule):
    """Image data set ``name`` (fashion_mnist, mnist, cifar10, image_folder, digits) as a DataModule.

    ``resolution`` / ``channels`` default to the data set's native values; ``labels`` to whether it
    has labels (image_folder: class subfolders only with ``labels=true``).
    """

    def __init__(
        self,
        name: str = "fashion_mnist",
        root: str | os.PathLike | None = None,
        download: bool = False,
        resolution: int | None = None,
        channels: int | None = None,
        labels: bool | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
        hflip: bool = False,
        subset: int | None = None,
        val_subset: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        check_choice("dataset.name", name, IMAGE_DATASETS)
        info = IMAGE_DATASETS[name]
        resolution = info.resolution if resolution is None else resolution
        if resolution is None:
            fail(f"dataset.resolution is not set; {name} needs it (e.g. dataset.resolution=64)")
        check_range("dataset.resolution", resolution, low=1)
        channels = info.channels if channels is None else channels
        check_choice("dataset.channels", channels, (1, 3))
        for setting, value in (("dataset.subset", subset), ("dataset.val_subset", val_subset)):
            if value is not None:
                check_range(setting, value, low=1)
        self.save_hyperparameters()
        self.name, self.root, self.download = name, root, download
        self.resolution, self.channels, self.labels = resolution, channels, labels
        self.hflip, self.subset, self.val_subset = hflip, subset, val_subset

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image."""
        return (self.channels, self.resolution, self.resolution)

    @property
    def data_shape(self) -> tuple[int, ...]:
        """Shape of one data item (same as :attr:`image_shape`; toy data has its own)."""
        return self.image_shape

    @property
    def num_classes(self) -> int | None:
        """Number of classes, or None for unlabeled data."""
        if self.name == "image_folder":
            return len(image_folder_classes(self.root)) if self.labels else None
        return IMAGE_DATASETS[self.name].num_classes if self.labels is not False else None

    def build(self, split: str) -> Dataset:
        """Build ``split`` with this module's settings (``subset`` for train, ``val_subset`` for test).

        A failed download (offline, a proxy, a server error) is one line naming ``dataset.download``
        and the way to provide the files instead; a full disk keeps its own message."""
        try:
            return build_dataset(
                self.name,
                split,
                root=self.root,
                download=self.download,
                resolution=self.resolution,
                channels=self.channels,
                hflip=self.hflip,
                labels=self.labels,
                subset=self.subset if split == "train" else self.val_subset,
            )
        except UserError:
            raise
        except Exception as err:
            if not self.download or find_disk_full(err):
                raise
            fail(
                f"dataset.download=true could not download {self.name} ({download_reason(err)}); "
                "is this machine offline? Put the files in a folder and set dataset.root=DIR "
                "dataset.download=false"
            )


class ToyDataModule(SplitDataModule):
    """Points from a toy ``sampler`` (see :mod:`fastsample.data.toy`); train and test use different seeds."""

    def __init__(
        self,
        sampler: ToySampler,
        size: int = 10000,
        val_size: int = 1000,
        batch_size: int = 256,
        num_workers: int = 0,
        seed: int = 0,
        num_classes: int | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, seed)
        check_range("dataset.size", size, low=1)
        check_range("dataset.val_size", val_size, low=1)
        self.save_hyperparameters(ignore=["sampler"])
        self.sampler, self.size, self.val_size = sampler, size, val_size
        self._num_classes = num_classes

    @property
    def data_shape(self) -> tuple[int, ...]:
        """Shape of one point, e.g. (2,)."""
        return tuple(self.dataset("train")[0][0].shape)

    @property
    def num_classes(self) -> int | None:
        """Number of mixture components if configured, else None."""
        return self._num_classes

    def build(self, split: str) -> Dataset:
        """Draw ``size`` (train) or ``val_size`` (test) points; the test split uses ``seed + 1``."""
        check_choice("split", split, ("train", "test"))
        if split == "train":
            return ToyDataset(self.sampler, self.size, self.seed)
        return ToyDataset(self.sampler, self.val_size, self.seed + 1)
