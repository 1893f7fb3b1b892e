"""Dataset builders and DataModules: shapes, ranges, labels, lookup errors, splits and batch sizes."""

from __future__ import annotations

import gzip
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from fastsample.data import (
    ImageDataModule,
    ToyDataModule,
    build_dataset,
    build_digits,
    build_fashion_mnist,
    per_device_batch_size,
    ring_mixture,
)
from fastsample.data.idx import read_idx
from fastsample.utils.errors import UserError

DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def _no_data_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # The lookup order includes $FASTSAMPLE_DATA; tests must not depend on the caller's environment.
    monkeypatch.delenv("FASTSAMPLE_DATA", raising=False)


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def _write_fake_idx_split(folder: Path, prefix: str, count: int, gz: bool = True) -> np.ndarray:
    folder.mkdir(parents=True, exist_ok=True)
    images = np.arange(count * 28 * 28, dtype=np.int64).reshape(count, 28, 28) % 256
    suffix = ".gz" if gz else ""
    _write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images)
    _write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", np.arange(count) % 10)
    return images


def _save_png(path: Path, size: tuple[int, int], color: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


# ----------------------------------------------------------------------------- digits


def test_digits_shapes_range_labels_and_split() -> None:
    train, test = build_digits("train"), build_digits("test")
    assert len(train) + len(test) == 1797
    assert len(test) == round(1797 * 0.2)
    image, label = train[0]
    assert image.shape == (1, 8, 8) and image.dtype == torch.float32
    assert label.dtype == torch.int64
    images = torch.stack([train[i][0] for i in range(len(train))])
    assert images.min() == -1 and images.max() == 1
    assert {int(train[i][1]) for i in range(len(train))} == set(range(10))
    # Deterministic: building again gives the same items.
    assert torch.equal(build_digits("test")[5][0], test[5][0])


def test_digits_resize_channels_subset_and_no_labels() -> None:
    data = build_dataset("digits", "train", resolution=16, channels=3, subset=10, labels=False)
    assert len(data) == 10
    image, label = data[0]
    assert image.shape == (3, 16, 16) and image.min() >= -1 and image.max() <= 1
    assert int(label) == -1


# ----------------------------------------------------------------------------- IDX / fashion_mnist


@pytest.mark.skipif(
    not (DEBIAN_FMNIST / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)
def test_fashion_mnist_from_debian_path() -> None:
    data = build_fashion_mnist("test", subset=64)
    assert len(data) == 64
    image, label = data[0]
    assert image.shape == (1, 28, 28) and image.min() >= -1 and image.max() <= 1
    assert label.dtype == torch.int64 and 0 <= int(label) < 10
    assert len(build_fashion_mnist("test")) == 10000


def test_idx_root_takes_priority_plain_and_gzip(tmp_path: Path) -> None:
    images = _write_fake_idx_split(tmp_path / "gz", "t10k", 5, gz=True)
    _write_fake_idx_split(tmp_path / "plain", "train", 3, gz=False)
    assert np.array_equal(read_idx(tmp_path / "gz" / "t10k-images-idx3-ubyte.gz"), images)
    test = build_fashion_mnist("test", root=tmp_path / "gz")
    assert len(test) == 5
    expected = torch.from_numpy(images[1]).float() / 127.5 - 1
    assert torch.allclose(test[1][0][0], expected) and int(test[1][1]) == 1
    assert len(build_dataset("mnist", "train", root=tmp_path / "plain")) == 3


def test_idx_found_via_env_and_torchvision_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_fake_idx_split(tmp_path / "mnist" / "MNIST" / "raw", "train", 4)
    monkeypatch.setenv("FASTSAMPLE_DATA", str(tmp_path))
    assert len(build_dataset("mnist", "train")) == 4


def test_missing_idx_lists_every_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTSAMPLE_DATA", str(tmp_path / "env"))
    with pytest.raises(UserError) as info:
        build_dataset("mnist", "train", root=tmp_path / "nowhere")
    message = str(info.value)
    assert str(tmp_path / "nowhere") in message and str(tmp_path / "env" / "mnist") in message
    assert "dataset.root=" in message and "dataset.download=true" in message
    assert "\n" not in message


def test_missing_fashion_mnist_names_debian_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fastsample.data import datasets

    # Point the system folder somewhere empty so the test does not depend on the installed package.
    empty = datasets.IdxSource(
        "fashion_mnist",
        "fashion-mnist",
        "FashionMNIST",
        str(tmp_path / "system"),
        datasets.FASHION_MNIST.install_hint,
    )
    monkeypatch.setattr(datasets, "FASHION_MNIST", empty)
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist") as info:
        build_fashion_mnist("train", root=tmp_path / "root")
    assert str(tmp_path / "root") in str(info.value) and str(tmp_path / "system") in str(info.value)


def test_download_without_destination_is_a_clear_error() -> None:
    with pytest.raises(UserError, match="dataset.root=DIR"):
        build_dataset("mnist", "train", download=True)


def test_cifar10_missing_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cifar10 not found"):
        build_dataset("cifar10", "train", root=tmp_path)


def test_unknown_dataset_name() -> None:
    with pytest.raises(UserError, match="dataset.name='nope'"):
        build_dataset("nope")


# ----------------------------------------------------------------------------- image_folder


def test_image_folder_resize_crop_and_labels(tmp_path: Path) -> None:
    _save_png(tmp_path / "cats" / "a.png", (40, 20), (255, 0, 0))
    _save_png(tmp_path / "cats" / "deep" / "b.png", (20, 20), (0, 255, 0))
    _save_png(tmp_path / "dogs" / "c.jpg", (16, 32), (0, 0, 255))
    data = build_dataset("image_folder", "train", root=tmp_path, resolution=8, labels=True)
    assert len(data) == 3 and data.classes == ["cats", "dogs"]
    assert [int(data[i][1]) for i in range(3)] == [0, 0, 1]
    red = data[0][0]
    assert red.shape == (3, 8, 8)
    assert torch.allclose(red[0], torch.ones(8, 8)) and torch.allclose(red[1], -torch.ones(8, 8))
    gray = build_dataset("image_folder", "test", root=tmp_path, resolution=4, channels=1)
    assert gray[0][0].shape == (1, 4, 4) and int(gray[0][1]) == -1


def test_image_folder_train_test_subfolders(tmp_path: Path) -> None:
    for split, count in (("train", 3), ("val", 2)):
        for index in range(count):
            _save_png(tmp_path / split / "only" / f"{index}.png", (8, 8), (10, 20, 30))
    assert len(build_dataset("image_folder", "train", root=tmp_path, resolution=8)) == 3
    assert len(build_dataset("image_folder", "test", root=tmp_path, resolution=8)) == 2


def test_image_folder_empty_and_missing(tmp_path: Path) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(UserError, match="no images"):
        build_dataset("image_folder", root=tmp_path / "empty", resolution=8)
    with pytest.raises(UserError, match="not a folder"):
        build_dataset("image_folder", root=tmp_path / "missing", resolution=8)
    with pytest.raises(UserError, match="dataset.resolution"):
        build_dataset("image_folder", root=tmp_path / "empty")


def test_image_folder_labels_need_class_subfolders(tmp_path: Path) -> None:
    _save_png(tmp_path / "top.png", (8, 8), (0, 0, 0))
    with pytest.raises(UserError, match="class subfolder"):
        build_dataset("image_folder", root=tmp_path, resolution=8, labels=True)


# ----------------------------------------------------------------------------- flips


def _flip_seen(data: torch.utils.data.Dataset, trials: int = 40) -> bool:
    first = data[0][0]
    return any(not torch.equal(data[0][0], first) for _ in range(trials))


def test_hflip_only_on_train() -> None:
    torch.manual_seed(0)
    assert _flip_seen(build_digits("train", hflip=True, subset=1))
    assert not _flip_seen(build_digits("test", hflip=True, subset=1))
    assert not _flip_seen(build_digits("train", hflip=False, subset=1))


# ----------------------------------------------------------------------------- DataModules


def test_image_datamodule_batches() -> None:
    module = ImageDataModule("digits", resolution=16, batch_size=32, subset=100, val_subset=40)
    assert module.image_shape == (1, 16, 16) and module.num_classes == 10
    module.setup("fit")
    images, labels = next(iter(module.train_dataloader()))
    assert images.shape == (32, 1, 16, 16) and labels.shape == (32,) and labels.dtype == torch.int64
    assert sum(len(batch[0]) for batch in module.val_dataloader()) == 40
    assert ImageDataModule("digits", labels=False, batch_size=8).num_classes is None


def test_toy_datamodule() -> None:
    module = ToyDataModule(ring_mixture, size=64, val_size=16, batch_size=16)
    points, labels = next(iter(module.train_dataloader()))
    assert points.shape == (16, 2) and labels.dtype == torch.int64
    assert module.data_shape == (2,)
    assert not torch.equal(module.dataset("train").points[:16], module.dataset("test").points)


def test_batch_size_errors() -> None:
    with pytest.raises(UserError, match="dataset.batch_size=0"):
        ImageDataModule("digits", batch_size=0)
    assert per_device_batch_size(64, 4) == 16
    message = "dataset.batch_size=10 does not divide across 4 devices; use a multiple of 4"
    with pytest.raises(UserError, match=message):
        per_device_batch_size(10, 4)


def test_batch_size_checked_against_trainer_world_size() -> None:
    module = ImageDataModule("digits", batch_size=6)
    module.trainer = SimpleNamespace(world_size=4)  # stands in for an attached multi-device Trainer
    with pytest.raises(UserError, match="across 4 devices"):
        module.setup("fit")
    module.trainer = SimpleNamespace(world_size=2)
    assert module.device_batch_size == 3
