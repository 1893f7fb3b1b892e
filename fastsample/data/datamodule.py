"""LightningDataModules over the dataset builders: images by name, and toy point clouds.

``dataset.batch_size`` is the *global* batch: each device loads ``batch_size / world_size`` items,
so a run's effective batch (and hence its learning-rate tuning) does not change with the number of
GPUs. The validation and test loaders both read the ``test`` split (the data sets here have no
separate validation split); ``val_subset`` trims it for quick runs.
"""

from __future__ import annotations

import os

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from fastsample.data.datasets import IMAGE_DATASETS, build_dataset, image_folder_classes
from fastsample.data.toy import ToyDataset, ToySampler
from fastsample.utils.errors import check_choice, check_range, fail


def per_device_batch_size(global_batch: int, world_size: int) -> int:
    """Split ``global_batch`` evenly over ``world_size`` devices, or fail naming the setting."""
    check_range("dataset.batch_size", global_batch, low=1)
    if global_batch % world_size:
        fail(
            f"dataset.batch_size={global_batch} does not divide across {world_size} devices; "
            f"use a multiple of {world_size}"
        )
    return global_batch // world_size


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
        # A seeded generator makes the shuffle order reproducible; under DDP Lightning swaps in a
        # DistributedSampler (seeded by the trainer) instead.
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            self.dataset(split),
            batch_size=self.device_batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            generator=generator,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches."""
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
        """Build ``split`` with this module's settings (``subset`` for train, ``val_subset`` for test)."""
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
