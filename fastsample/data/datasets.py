"""Plain dataset builders: ``(image, label)`` pairs, float32 (C, H, W) images in [-1, 1], int64 labels.

Every image builder has the same keyword signature (see :func:`build_dataset`) so a DataModule, a
metrics script or a notebook can build any of them by name. A label is -1 where the data has none
(or when ``labels=False`` asks to drop them). Lookup order for file-based data sets:

1. the configured ``root``,
2. ``$FASTSAMPLE_DATA/<name>``,
3. a system copy (Debian's ``dataset-fashion-mnist`` installs ``/usr/share/datasets/fashion-mnist``),
4. with ``download=True``, torchvision's downloader into ``root`` (or ``$FASTSAMPLE_DATA/<name>``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from fastsample.data.idx import find_idx_file, read_idx
from fastsample.data.transforms import convert_channels, resize_center_crop, to_unit_range
from fastsample.utils.errors import check_choice, check_range, fail
from fastsample.utils.images import IMAGE_EXTENSIONS, list_images

SPLITS = ("train", "test")
DATA_ENV = "FASTSAMPLE_DATA"
DIGITS_TEST_FRACTION = 0.2


class ArrayImageDataset(Dataset):
    """In-memory images (N, C, H, W), uint8 in [0, 255] or float in [-1, 1], with int64 labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, hflip: bool = False) -> None:
        if len(images) != len(labels):
            fail(f"data set has {len(images)} images but {len(labels)} labels; the files are inconsistent")
        self.images = images
        self.labels = labels.long()
        self.hflip = hflip

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return maybe_flip(to_unit_range(self.images[index]), self.hflip), self.labels[index]


def maybe_flip(image: torch.Tensor, enabled: bool) -> torch.Tensor:
    """Flip ``image`` left-right with probability 1/2 when ``enabled``.

    Uses the global torch RNG, which the DataLoader seeds per worker, so workers differ.
    """
    if enabled and torch.rand(()) < 0.5:
        return image.flip(-1)
    return image


def _check_split(split: str) -> None:
    check_choice("split", split, SPLITS)


def _check_subset(subset: int | None) -> None:
    if subset is not None:
        check_range("dataset.subset", subset, low=1)


def prepare_arrays(
    images: torch.Tensor,
    labels: torch.Tensor,
    split: str,
    *,
    resolution: int | None,
    channels: int | None,
    hflip: bool,
    subset: int | None,
    keep_labels: bool,
) -> ArrayImageDataset:
    """Take the first ``subset`` items, resize / convert channels once, and wrap them.

    Subsetting comes first so quick runs never resize the full array. Flips apply to train only.
    """
    _check_subset(subset)
    if subset is not None:
        images, labels = images[:subset], labels[:subset]
    if resolution is not None:
        check_range("dataset.resolution", resolution, low=1)
        images = resize_center_crop(images, resolution)
    if channels is not None:
        images = convert_channels(images, channels)
    labels = labels.long() if keep_labels else torch.full((len(images),), -1, dtype=torch.long)
    return ArrayImageDataset(images.contiguous(), labels, hflip=hflip and split == "train")


# ----------------------------------------------------------------------------- locating files


def data_roots(root: str | os.PathLike | None, env_subdir: str, system_dir: str | None = None) -> list[Path]:
    """The folders to search, in priority order: ``root``, ``$FASTSAMPLE_DATA/<env_subdir>``, system."""
    roots = [Path(root).expanduser()] if root else []
    if os.environ.get(DATA_ENV):
        roots.append(Path(os.environ[DATA_ENV]).expanduser() / env_subdir)
    if system_dir:
        roots.append(Path(system_dir))
    return roots


def download_root(name: str, root: str | os.PathLike | None, env_subdir: str) -> Path:
    """Where ``download=True`` writes: ``root`` if set, else ``$FASTSAMPLE_DATA/<env_subdir>``."""
    roots = data_roots(root, env_subdir)
    if not roots:
        fail(
            f"dataset.download=true for {name} needs a place to write: set dataset.root=DIR "
            f"or the environment variable {DATA_ENV}"
        )
    return roots[0]


@dataclass(frozen=True)
class IdxSource:
    """Where an IDX data set lives: folder names and the torchvision class used to download it."""

    name: str
    env_subdir: str
    torchvision_class: str
    system_dir: str | None = None
    install_hint: str = ""


FASHION_MNIST = IdxSource(
    "fashion_mnist",
    "fashion-mnist",
    "FashionMNIST",
    "/usr/share/datasets/fashion-mnist",
    "`apt-get install dataset-fashion-mnist`, ",
)
MNIST = IdxSource("mnist", "mnist", "MNIST")


def _idx_folders(source: IdxSource, root: str | os.PathLike | None) -> list[Path]:
    """Each search root itself plus torchvision's ``<root>/<Class>/raw`` layout (left by a download)."""
    folders = []
    for base in data_roots(root, source.env_subdir, source.system_dir):
        folders += [base, base / source.torchvision_class / "raw"]
    return folders


def load_idx_split(
    source: IdxSource, split: str, root: str | os.PathLike | None, download: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load (uint8 images (N, 1, H, W), int64 labels) of one split from IDX files or a download."""
    prefix = "train" if split == "train" else "t10k"
    stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    folders = _idx_folders(source, root)
    for folder in folders:
        image_file, label_file = (find_idx_file(folder, stem) for stem in stems)
        if image_file and label_file:
            images = torch.from_numpy(read_idx(image_file)).unsqueeze(1)
            return images, torch.from_numpy(read_idx(label_file)).long()
    if download:
        return _download_idx(source, split, root)
    looked = ", ".join(map(str, folders)) or "(nowhere: no root configured)"
    fail(
        f"{source.name} {split} files ({stems[0]}[.gz], {stems[1]}[.gz]) not found; looked in: {looked}. "
        f"Provide them with {source.install_hint}dataset.root=DIR, or dataset.download=true"
    )


def _download_idx(
    source: IdxSource, split: str, root: str | os.PathLike | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fetch through torchvision (connected machines); files land in ``<root>/<Class>/raw``."""
    import torchvision.datasets

    target = download_root(source.name, root, source.env_subdir)
    dataset_class = getattr(torchvision.datasets, source.torchvision_class)
    dataset = dataset_class(str(target), train=split == "train", download=True)
    return dataset.data.unsqueeze(1), dataset.targets.long()


# ----------------------------------------------------------------------------- builders


def _build_idx(
    source: IdxSource,
    split: str,
    *,
    root: str | os.PathLike | None = None,
    download: bool = False,
    resolution: int | None = None,
    channels: int | None = None,
    hflip: bool = False,
    subset: int | None = None,
    labels: bool = True,
) -> ArrayImageDataset:
    _check_split(split)
    images, targets = load_idx_split(source, split, root, download)
    return prepare_arrays(
        images,
        targets,
        split,
        resolution=resolution,
        channels=channels,
        hflip=hflip,
        subset=subset,
        keep_labels=labels,
    )


def build_fashion_mnist(split: str, **options) -> ArrayImageDataset:
    """Fashion-MNIST (28x28 grayscale, 10 classes) from IDX files or torchvision's download."""
    return _build_idx(FASHION_MNIST, split, **options)


def build_mnist(split: str, **options) -> ArrayImageDataset:
    """MNIST (28x28 grayscale, 10 classes) from IDX files or torchvision's download."""
    return _build_idx(MNIST, split, **options)


def build_cifar10(
    split: str,
    *,
    root: str | os.PathLike | None = None,
    download: bool = False,
    resolution: int | None = None,
    channels: int | None = None,
    hflip: bool = False,
    subset: int | None = None,
    labels: bool = True,
) -> ArrayImageDataset:
    """CIFAR-10 (32x32 RGB, 10 classes): torchvision's loader on ``root`` or ``$FASTSAMPLE_DATA/cifar10``."""
    _check_split(split)
    images, targets = _load_cifar10(split, root, download)
    return prepare_arrays(
        images,
        targets,
        split,
        resolution=resolution,
        channels=channels,
        hflip=hflip,
        subset=subset,
        keep_labels=labels,
    )


def _load_cifar10(
    split: str, root: str | os.PathLike | None, download: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision.datasets import CIFAR10

    train = split == "train"
    roots = data_roots(root, "cifar10")
    for base in roots:
        if (base / CIFAR10.base_folder).is_dir():
            try:
                dataset = CIFAR10(str(base), train=train, download=False)
            except RuntimeError:  # torchvision's md5 check failed: keep looking, then report
                continue
            break
    else:
        if not download:
            looked = ", ".join(f"{base}/{CIFAR10.base_folder}" for base in roots) or "(nowhere: no root set)"
            fail(
                f"cifar10 not found (or corrupted); looked in: {looked}. Provide it with dataset.root=DIR "
                f"(holding {CIFAR10.base_folder}/) or dataset.download=true"
            )
        dataset = CIFAR10(str(download_root("cifar10", root, "cifar10")), train=train, download=True)
    images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2)
    return images, torch.as_tensor(dataset.targets, dtype=torch.long)


def build_digits(
    split: str,
    *,
    root: str | os.PathLike | None = None,
    download: bool = False,
    resolution: int | None = None,
    channels: int | None = None,
    hflip: bool = False,
    subset: int | None = None,
    labels: bool = True,
) -> ArrayImageDataset:
    """sklearn's bundled 8x8 digits (offline): values 0..16 scaled to [-1, 1], labels 0..9.

    The split is deterministic: the last 20% of the 1797 images are the test set. ``root`` and
    ``download`` are accepted for a uniform signature and ignored (the data ships with sklearn).
    """
    from sklearn.datasets import load_digits

    _check_split(split)
    digits = load_digits()
    images = torch.from_numpy(digits.images).float().unsqueeze(1) / 8 - 1
    targets = torch.from_numpy(digits.target).long()
    cut = round(len(images) * (1 - DIGITS_TEST_FRACTION))
    part = slice(None, cut) if split == "train" else slice(cut, None)
    return prepare_arrays(
        images[part],
        targets[part],
        split,
        resolution=resolution,
        channels=channels,
        hflip=hflip,
        subset=subset,
        keep_labels=labels,
    )


SAMPLE_PATCH_SIZE, SAMPLE_PATCH_STRIDE = 32, 16


def build_sample_patches(
    split: str,
    *,
    root: str | os.PathLike | None = None,
    download: bool = False,
    resolution: int | None = None,
    channels: int | None = None,
    hflip: bool = False,
    subset: int | None = None,
    labels: bool = True,
) -> ArrayImageDataset:
    """32x32 RGB patches of scikit-learn's two bundled photos (offline): colorization tests and docs.

    ``sklearn.datasets.load_sample_images`` ships ``china.jpg`` and ``flower.jpg`` (427x640); patches
    are cut on a stride-16 grid (1950 in all) and shuffled with a fixed seed; the last 20% are the
    test split (neighbouring patches overlap, so it is not independent of the training split: fine
    for examples and tests, not for held-out metrics). The label is the photo a patch comes from
    (0 china, 1 flower). ``root`` and
    ``download`` are accepted for a uniform signature and ignored.
    """
    from sklearn.datasets import load_sample_images

    _check_split(split)
    photos = torch.from_numpy(np.stack(load_sample_images().images)).permute(0, 3, 1, 2)  # (2, 3, H, W)
    size, stride = SAMPLE_PATCH_SIZE, SAMPLE_PATCH_STRIDE
    patches = photos.unfold(2, size, stride).unfold(3, size, stride)  # (2, 3, rows, cols, size, size)
    per_photo = patches.shape[2] * patches.shape[3]
    images = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3, size, size).contiguous()
    targets = torch.arange(len(photos)).repeat_interleave(per_photo)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    cut = round(len(images) * (1 - DIGITS_TEST_FRACTION))
    part = order[:cut] if split == "train" else order[cut:]
    return prepare_arrays(
        images[part],
        targets[part],
        split,
        resolution=resolution,
        channels=channels,
        hflip=hflip,
        subset=subset,
        keep_labels=labels,
    )


# ----------------------------------------------------------------------------- image folders


def _split_folder(root: Path, split: str) -> Path:
    """``root/train`` and ``root/test`` (or ``root/val``) when present, else the whole tree for both."""
    names = ("train",) if split == "train" else ("test", "val")
    for name in names:
        if (root / name).is_dir() and (root / "train").is_dir():
            return root / name
    return root


def image_folder_classes(root: str | os.PathLike) -> list[str]:
    """Class names: the first-level subfolders of the training tree that contain images, sorted."""
    folder = _split_folder(_existing_root(root), "train")
    return sorted({p.relative_to(folder).parts[0] for p in list_images(folder) if p.parent != folder})


def _existing_root(root: str | os.PathLike | None) -> Path:
    if not root:
        fail("dataset.root is not set; image_folder needs dataset.root=DIR (a tree of images)")
    path = Path(root).expanduser()
    if not path.is_dir():
        fail(f"dataset.root={path} is not a folder; point it at a tree of images")
    return path


class ImageFolderDataset(Dataset):
    """Any tree of images (LSUN / CelebA / ImageNet-style), loaded lazily and resized per item.

    Each image is resized so its shorter side is ``resolution`` and center-cropped. With
    ``labels=True`` the label is the index of its first-level subfolder (sorted names) in the
    training tree; otherwise -1. A ``train/`` + ``test/`` (or ``val/``) pair under ``root`` is used
    as the split; without it both splits read the whole tree.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        *,
        resolution: int,
        channels: int = 3,
        labels: bool = False,
        hflip: bool = False,
        subset: int | None = None,
    ) -> None:
        _check_split(split)
        _check_subset(subset)
        check_range("dataset.resolution", resolution, low=1)
        check_choice("dataset.channels", channels, (1, 3))
        base = _existing_root(root)
        self.folder = _split_folder(base, split)
        self.files = list_images(self.folder)[:subset]
        if not self.files:
            fail(
                f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {self.folder}; "
                "set dataset.root to a folder that contains image files"
            )
        self.resolution, self.channels = resolution, channels
        self.hflip = hflip and split == "train"
        self.classes = image_folder_classes(base) if labels else []
        self.targets = [self._label(path) for path in self.files] if labels else [-1] * len(self.files)

    def _label(self, path: Path) -> int:
        relative = path.relative_to(self.folder)
        if len(relative.parts) < 2 or relative.parts[0] not in self.classes:
            fail(
                f"dataset.labels=true needs every image in a class subfolder of the training tree "
                f"({self.folder}/<class>/...); {path} is not"
            )
        return self.classes.index(relative.parts[0])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:

        with Image.open(self.files[index]) as image:
            pixels = np.asarray(image.convert("RGB" if self.channels == 3 else "L"))
        tensor = torch.from_numpy(pixels.copy()).reshape(*pixels.shape[:2], -1).permute(2, 0, 1)
        image_tensor = to_unit_range(resize_center_crop(tensor, self.resolution))
        return maybe_flip(image_tensor, self.hflip), torch.tensor(self.targets[index], dtype=torch.long)


def build_image_folder(
    split: str,
    *,
    root: str | os.PathLike | None = None,
    download: bool = False,
    resolution: int | None = None,
    channels: int | None = None,
    hflip: bool = False,
    subset: int | None = None,
    labels: bool = False,
) -> ImageFolderDataset:
    """An :class:`ImageFolderDataset`; ``resolution`` is required, ``download`` is not supported."""
    if download:
        fail("dataset.download=true is not supported for image_folder; put the images under dataset.root")
    if resolution is None:
        fail("dataset.resolution is not set; image_folder needs it (e.g. dataset.resolution=64)")
    return ImageFolderDataset(
        _existing_root(root),
        split,
        resolution=resolution,
        channels=channels or 3,
        labels=labels,
        hflip=hflip,
        subset=subset,
    )


# ----------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class ImageDatasetInfo:
    """A builder and what it yields by default, so shapes are known without loading data."""

    builder: Callable[..., Dataset]
    resolution: int | None  # None: must be configured
    channels: int
    num_classes: int | None  # None: unlabeled, or (image_folder) found by scanning folders


IMAGE_DATASETS: dict[str, ImageDatasetInfo] = {
    "fashion_mnist": ImageDatasetInfo(build_fashion_mnist, 28, 1, 10),
    "mnist": ImageDatasetInfo(build_mnist, 28, 1, 10),
    "cifar10": ImageDatasetInfo(build_cifar10, 32, 3, 10),
    "digits": ImageDatasetInfo(build_digits, 8, 1, 10),
    "sample_patches": ImageDatasetInfo(build_sample_patches, 32, 3, 2),
    "image_folder": ImageDatasetInfo(build_image_folder, None, 3, None),
}


def build_dataset(
    name: str,
    split: str = "train",
    *,
    root: str | os.PathLike | None = None,
    download: bool = False,
    resolution: int | None = None,
    channels: int | None = None,
    hflip: bool = False,
    subset: int | None = None,
    labels: bool | None = None,
) -> Dataset:
    """Build image data set ``name`` (one of :data:`IMAGE_DATASETS`) for ``split`` ('train' / 'test').

    ``labels=None`` keeps each builder's default (labeled sets keep labels; image_folder has none).
    """
    check_choice("dataset.name", name, IMAGE_DATASETS)
    _check_split(split)
    options = dict(
        root=root, download=download, resolution=resolution, channels=channels, hflip=hflip, subset=subset
    )
    if labels is not None:
        options["labels"] = labels
    return IMAGE_DATASETS[name].builder(split, **options)
