"""Data: dataset builders (images in [-1, 1], int64 labels) and LightningDataModules over them."""

from fastsample.data.datamodule import ImageDataModule, SplitDataModule, ToyDataModule, per_device_batch_size
from fastsample.data.datasets import (
    IMAGE_DATASETS,
    ArrayImageDataset,
    ImageFolderDataset,
    build_cifar10,
    build_dataset,
    build_digits,
    build_fashion_mnist,
    build_image_folder,
    build_mnist,
)
from fastsample.data.toy import ToyDataset, ToySampler, ring_mixture

__all__ = [
    "IMAGE_DATASETS",
    "ArrayImageDataset",
    "ImageDataModule",
    "ImageFolderDataset",
    "SplitDataModule",
    "ToyDataModule",
    "ToyDataset",
    "ToySampler",
    "build_cifar10",
    "build_dataset",
    "build_digits",
    "build_fashion_mnist",
    "build_image_folder",
    "build_mnist",
    "per_device_batch_size",
    "ring_mixture",
]
