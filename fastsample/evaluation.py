"""Sample-quality evaluation: one :class:`Evaluator` behind ``evaluate.py``, the FID training callback
and the benchmarks.

An :class:`Evaluator` binds a feature extractor (``conf/metrics``: a domain classifier, Inception or any
module) to reference statistics and turns images into scores::

    evaluator = Evaluator(classifier_features(), reference="refs/fmnist-train.npz")
    evaluator.score_npz("outputs/sample/.../samples.npz")   # {"fid": ..., "kid_mean": ..., ...}

Images stream through in batches (features are folded into float64 running statistics), so memory
does not grow with the number of samples; only a capped sample of raw features (for KID and precision /
recall) and the logits (for IS) are kept. Inputs are validated batch by batch: uint8 ``(N, H, W, C)``
(what ``sample.py`` saves) or float ``(N, C, H, W)`` in [-1, 1] (what a sampler returns).

Reference files are EDM-compatible ``.npz`` (``mu``, ``sigma`` + metadata, see
:mod:`fastsample.metrics.reference`); ours may also hold ``features``, a capped sample of the reference
set's raw features, which KID and precision / recall need. A reference without them (EDM's, clean-fid's)
still gives FID (and IS); KID / PR are then skipped with a warning.

:func:`evaluate` is the job behind ``evaluate.py`` (``mode=ref|score|generate``); its pieces
(:func:`build_evaluator`, :func:`prepare_reference`, :func:`score_samples_path`) are what the
benchmarks reuse.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import time
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fastsample.metrics import (
    ClassifierFeatures,
    FeatureExtractor,
    FeatureStats,
    ReferenceStats,
    check_compatible,
    frechet_distance,
    inception_score,
    iter_batches,
    kid,
    load_reference,
    precision_recall,
)
from fastsample.metrics.resumable import extract_in_parts, finish_parts, parts_dir_for
from fastsample.utils.errors import check_choice, check_range, fail
from fastsample.utils.io import save_npz_atomic, write_json_atomic

SCORES = ("fid", "is", "kid", "pr")
MODES = ("ref", "score", "generate")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
SAMPLE_KEYS = ("images", "arr_0")  # ours (sample.py); OpenAI / ADM-style sample batches
DEFAULT_CLASSIFIER = "fmnist_classifier.pt"  # shipped asset (fastsample.models.bundle.asset_path)

ImageBatch = torch.Tensor | np.ndarray
log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Reference statistics with a capped sample of raw features


@dataclasses.dataclass
class Reference(ReferenceStats):
    """:class:`ReferenceStats` plus (optionally) a capped sample of the reference's raw features."""

    features: np.ndarray | None = None


def as_reference(ref: ReferenceStats, features: np.ndarray | None = None) -> Reference:
    """A :class:`Reference` from plain :class:`ReferenceStats` (fields copied)."""
    if isinstance(ref, Reference) and features is None:
        return ref
    fields = {f.name: getattr(ref, f.name) for f in dataclasses.fields(ReferenceStats)}
    return Reference(**fields, features=features if features is not None else getattr(ref, "features", None))


def save_reference_file(path: str | os.PathLike, ref: Reference) -> Reference:
    """Write ``ref`` atomically as an EDM-compatible ``.npz`` (``mu``, ``sigma``, metadata, ``features``).

    EDM's ``fid.py`` reads only ``mu`` and ``sigma``; the extra keys are 0-d metadata arrays and the
    optional float32 ``features`` matrix.
    """
    # Unknown metadata is omitted rather than stored as a sentinel (as in metrics.save_reference).
    metadata = {key: np.array(value) for key, value in ref.metadata().items() if value is not None}
    extra = {} if ref.features is None else {"features": np.asarray(ref.features, dtype=np.float32)}
    save_npz_atomic(
        path, mu=np.asarray(ref.mu, np.float64), sigma=np.asarray(ref.sigma, np.float64), **metadata, **extra
    )
    return dataclasses.replace(ref, path=str(path))


def read_reference(path: str | os.PathLike) -> Reference:
    """Read a reference ``.npz`` (ours, EDM's or clean-fid's) with its ``features`` if stored."""
    ref = load_reference(path)  # validates the file, mu and sigma
    with np.load(path, allow_pickle=False) as data:
        features = data["features"] if "features" in data.files else None
    if features is not None and (features.ndim != 2 or features.shape[1] != len(ref.mu)):
        fail(
            f"reference statistics file {str(path)!r}: features must be (N, {len(ref.mu)}), "
            f"got {features.shape}"
        )
    return as_reference(ref, features)


# --------------------------------------------------------------------------------------------------
# Feature extractors from config (conf/metrics/*.yaml)


def classifier_features(
    path: str | os.PathLike | None = None, noise_label: float | None = None
) -> ClassifierFeatures:
    """Domain-classifier features ("Frechet classifier distance") from a classifier bundle file.

    ``path`` defaults to the shipped Fashion-MNIST classifier (``fmnist_classifier.pt`` in
    ``$FASTSAMPLE_ASSETS`` or the package's ``assets``); any bundle or ``.ckpt`` of ``train.py
    task=classifier`` works (read by :func:`fastsample.models.bundle.load_classifier`).
    A clean classifier is used through its raw network with the bundle's noise label, so the
    extractor's name (``classifier:<hash of the network's weights>``) is the one
    ``ClassifierFeatures(network)`` gives anywhere else; ``noise_label`` overrides the bundle's.
    """
    from fastsample.models import bundle

    if path is None:
        path = bundle.asset_path(DEFAULT_CLASSIFIER)
    classifier = bundle.load_classifier(path, setting="metrics.path")
    convention = getattr(classifier, "convention", {})
    if convention.get("kind") == "clean" and hasattr(classifier, "net"):
        label = convention.get("noise_label", 0.0) if noise_label is None else noise_label
        return ClassifierFeatures(classifier.net, noise_label=label)
    # A noise-conditioned (guidance) classifier: its own wrapper maps sigma = noise_label to the network.
    return ClassifierFeatures(classifier, noise_label=0.0 if noise_label is None else noise_label)


def expected_input_shape(extractor: FeatureExtractor) -> tuple[int, int, int] | None:
    """(C, H, W) the extractor's network needs, when it declares one (classifiers do)."""
    module = getattr(extractor, "module", None)
    for attr in ("input_shape", "image_shape"):
        shape = getattr(module, attr, None)
        if shape is not None and len(tuple(shape)) == 3:
            return tuple(int(s) for s in shape)
    return None


# --------------------------------------------------------------------------------------------------
# Input validation


def _shape_text(shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in shape)


def check_image_batch(batch: Any, what: str = "samples") -> tuple[int, int, int]:
    """Validate one image batch; returns its (C, H, W). Fails naming what is expected.

    Allowed: uint8 (N, H, W, C) with C in (1, 3), or float (N, C, H, W) in [-1, 1].
    """
    if not isinstance(batch, (torch.Tensor, np.ndarray)):
        fail(f"{what}: expected arrays of images, got {type(batch).__name__}")
    dtype = batch.dtype
    is_uint8 = dtype in (torch.uint8, np.uint8)
    is_float = (
        batch.is_floating_point() if isinstance(batch, torch.Tensor) else np.issubdtype(dtype, np.floating)
    )
    shape = tuple(batch.shape)
    if is_uint8:
        if len(shape) != 4 or shape[-1] not in (1, 3):
            fail(f"{what}: uint8 images must be (N, H, W, C) with C = 1 or 3, got shape {shape}")
        return shape[3], shape[1], shape[2]
    if not is_float:
        fail(
            f"{what}: images must be uint8 (N, H, W, C) in [0, 255] or float (N, C, H, W) in [-1, 1], "
            f"got dtype {dtype}"
        )
    if len(shape) != 4 or shape[1] not in (1, 3):
        fail(f"{what}: float images must be (N, C, H, W) with C = 1 or 3, in [-1, 1], got shape {shape}")
    if shape[0]:
        values = torch.as_tensor(batch)
        low, high = float(values.min()), float(values.max())
        if low >= 0.0 and high > 2.0:
            fail(
                f"{what}: float images must be in [-1, 1], got values in [{low:g}, {high:g}] "
                "(0-255 pixels? pass them as uint8 (N, H, W, C))"
            )
    return shape[1], shape[2], shape[3]


# --------------------------------------------------------------------------------------------------
# The evaluator


class Evaluator:
    """Features of images -> FID / IS / KID / precision-recall against a reference.

    Args:
        extractor: the feature extractor (see :mod:`fastsample.metrics.features`).
        reference: reference statistics, a path to a reference ``.npz``, or ``None`` (only IS then).
        scores: which of ``fid``, ``is`` (needs logits), ``kid``, ``pr`` (both need reference features).
        batch_size: images per extractor call.
        keep_features: raw feature rows kept per set (samples and reference) for KID and PR; PR uses
            as many reference rows as there are sample rows (a seeded subset).
        kid_subsets, kid_subset_size: KID's random subsets.
        pr_k: the k of the k-NN manifolds of precision / recall.
        is_splits: Inception Score splits (fewer when there are fewer samples).
        device: where the extractor runs (default: where it is).
        progress: show a progress bar over feature batches.
    """

    def __init__(
        self,
        extractor: FeatureExtractor,
        reference: ReferenceStats | str | os.PathLike | None = None,
        *,
        scores: Sequence[str] = SCORES,
        batch_size: int = 250,
        keep_features: int = 10_000,
        keep_logits: int = 50_000,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        pr_k: int = 3,
        is_splits: int = 10,
        device: str | torch.device | None = None,
        progress: bool = False,
    ) -> None:
        if not isinstance(extractor, FeatureExtractor):
            fail(
                f"the feature extractor must be a fastsample.metrics.FeatureExtractor, "
                f"got {type(extractor).__name__}; wrap a plain module with ModuleFeatures"
            )
        for score in scores:
            check_choice("scores", score, SCORES)
        for setting, value, low in (
            ("batch_size", batch_size, 1),
            ("keep_features", keep_features, 0),
            ("keep_logits", keep_logits, 0),
            ("kid_subsets", kid_subsets, 1),
            ("kid_subset_size", kid_subset_size, 2),
            ("pr_k", pr_k, 1),
            ("is_splits", is_splits, 1),
        ):
            check_range(setting, value, low=low)
        self.extractor = extractor if device is None else extractor.to(device)
        self.scores = tuple(scores)
        self.batch_size, self.keep_features, self.keep_logits = batch_size, keep_features, keep_logits
        self.kid_subsets, self.kid_subset_size, self.pr_k, self.is_splits = (
            kid_subsets,
            kid_subset_size,
            pr_k,
            is_splits,
        )
        self.progress = progress
        self._reference: Reference | None = None
        self.reference = reference

    # -- reference ---------------------------------------------------------------------------------
    @property
    def reference(self) -> Reference | None:
        """The reference statistics scores are computed against (``None``: IS only)."""
        return self._reference

    @reference.setter
    def reference(self, ref: ReferenceStats | str | os.PathLike | None) -> None:
        if isinstance(ref, (str, os.PathLike)):
            ref = read_reference(ref)
        if ref is not None:
            check_compatible(ref, self.extractor)
            ref = as_reference(ref)
        self._reference = ref

    def build_reference(
        self,
        source: Any,
        *,
        split: str = "train",
        dataset: str | None = None,
        path: str | os.PathLike | None = None,
    ) -> Reference:
        """Reference statistics of a data set: a DataModule (its ``split``) or images / image batches.

        Keeps up to ``keep_features`` raw feature rows for KID / PR (from a DataModule: a seeded random
        sample; from images: the first ones).
        With ``path`` the result is also written there (atomically). Does not change
        :attr:`reference`; assign the result to use it.
        """
        if hasattr(source, "dataset") and callable(source.dataset):
            from torch.utils.data import DataLoader

            dataset = dataset or getattr(source, "name", None) or type(source).__name__
            # A seeded shuffle: the statistics do not depend on the order, but the kept raw features
            # are then a uniform sample even of data stored class by class (image folders).
            images: Any = DataLoader(
                source.dataset(split),
                batch_size=self.batch_size,
                shuffle=True,
                generator=torch.Generator().manual_seed(0),
            )
        else:
            images = source
        what = f"reference images ({dataset or 'data'}/{split})"
        if path is None:
            stats, shape = self._extract(images, what)
        else:  # written to a file: in parts, so a killed run resumes
            stats, shape = self._extract_resumable(images, what, path)
        ref = Reference(
            stats.mu,
            stats.sigma,
            extractor=self.extractor.name,
            weights_hash=self.extractor.weights_hash,
            dataset=dataset,
            split=split,
            count=stats.count,
            resolution=shape[1] if shape else None,
            features=stats.features,
        )
        if path is not None:
            ref = save_reference_file(path, ref)
            finish_parts(parts_dir_for(path))
        return ref

    def _extract_resumable(self, images: Any, what: str, path: str | os.PathLike) -> tuple[FeatureStats, Any]:
        """:meth:`_extract` in parts saved beside ``path``: a rerun after a kill resumes (see
        :mod:`fastsample.metrics.resumable`)."""
        return extract_in_parts(
            lambda batches: self._extract(batches, what),
            iter_batches(images, self.batch_size),
            parts_dir_for(path),
            {"extractor": self.extractor.name, "weights_hash": self.extractor.weights_hash},
            batch_size=self.batch_size,
            keep_features=self.keep_features,
            keep_logits=self.keep_logits,
        )

    # -- features ----------------------------------------------------------------------------------
    def features(self, images: ImageBatch | Iterable[Any], what: str = "samples") -> FeatureStats:
        """Stream ``images`` (an array or an iterable of batches) through the extractor."""
        return self._extract(images, what)[0]

    def _extract(self, images: ImageBatch | Iterable[Any], what: str) -> tuple[FeatureStats, tuple | None]:
        stats = FeatureStats(self.keep_features, self.keep_logits)
        expected = expected_input_shape(self.extractor)
        shape: tuple[int, int, int] | None = None
        if not isinstance(images, (torch.Tensor, np.ndarray, Iterable)):
            fail(
                f"{what}: expected an image array or an iterable of image batches, "
                f"got {type(images).__name__}"
            )
        from tqdm import tqdm

        batches = tqdm(
            iter_batches(images, self.batch_size),
            desc=f"features of {what}",
            total=_batch_count(images, self.batch_size),
            unit="batch",
            disable=not self.progress,
            leave=False,
        )
        for batch in batches:
            batch_shape = check_image_batch(batch, what)
            if shape is None:
                shape = batch_shape
                self._check_shape(shape, expected, what)
            elif batch_shape != shape:
                fail(
                    f"{what}: image shape changed from {_shape_text(shape)} to {_shape_text(batch_shape)} "
                    "(C x H x W) between batches"
                )
            if len(batch) == 0:
                continue
            output = self.extractor(batch)
            stats.update(output["features"], output["logits"])
        return stats, shape

    def _check_shape(
        self, shape: tuple[int, int, int], expected: tuple[int, int, int] | None, what: str
    ) -> None:
        channels = getattr(self.extractor, "channels", None)
        if channels is not None and shape[0] not in (channels, 1):
            fail(
                f"{what}: {shape[0]}-channel images, but the feature extractor {self.extractor.name!r} "
                f"needs {channels} channels"
            )
        if expected is not None and shape != expected:
            fail(
                f"{what}: images are {_shape_text(shape)} (C x H x W) but the feature extractor "
                f"{self.extractor.name!r} expects {_shape_text(expected)}"
            )
        ref = self._reference
        if ref is not None and ref.resolution is not None and shape[1] != ref.resolution:
            warnings.warn(
                f"{what} are {shape[1]}px but the reference statistics ({ref.describe()}) are "
                f"{ref.resolution}px: the scores compare different resolutions",
                stacklevel=3,
            )

    # -- scores ------------------------------------------------------------------------------------
    def score_stats(self, stats: FeatureStats) -> dict[str, float]:
        """Scores of accumulated sample features against :attr:`reference`."""
        ref = self._reference
        results: dict[str, float] = {"num_samples": stats.count}
        if "fid" in self.scores and ref is not None:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="covariance of .* is singular")
                sigma = stats.sigma  # fails with "need at least 2 samples" on too few
            results["fid"] = frechet_distance(stats.mu, sigma, ref.mu, ref.sigma)
        else:
            stats.mu  # noqa: B018  (fails on an empty set, naming the count)
        logits = stats.logits
        if "is" in self.scores and logits is not None:
            results["is_mean"], results["is_std"] = inception_score(logits, min(self.is_splits, len(logits)))
        wants_real = [score for score in ("kid", "pr") if score in self.scores]
        if wants_real and ref is not None:
            if ref.features is None or stats.features is None:
                warnings.warn(
                    f"{', '.join(wants_real).upper()} skipped: the reference file "
                    f"{ref.path or ''} stores no raw features (only mu / sigma)",
                    stacklevel=2,
                )
            else:
                if "kid" in self.scores:
                    results["kid_mean"], results["kid_std"] = kid(
                        stats.features, ref.features, self.kid_subsets, self.kid_subset_size
                    )
                if "pr" in self.scores:
                    real = equal_size_subset(ref.features, len(stats.features))
                    results["precision"], results["recall"] = precision_recall(
                        real, stats.features, self.pr_k
                    )
        return results

    def score_images(self, images: ImageBatch | Iterable[Any], what: str = "samples") -> dict[str, float]:
        """Scores of images: an array or an iterable of uint8 (N, H, W, C) / float (N, C, H, W) batches."""
        return self.score_stats(self.features(images, what))

    def score_npz(self, path: str | os.PathLike) -> dict[str, float]:
        """Scores of the uint8 images in a ``samples.npz`` (key ``images``, or ``arr_0``)."""
        return self.score_images(load_npz_images(path), what=f"samples {str(path)!r}")

    def score_folder(self, path: str | os.PathLike) -> dict[str, float]:
        """Scores of the image files (PNG, JPEG, ...) under a folder, read in batches."""
        return self.score_images(iter_folder_images(path, self.batch_size), what=f"images in {str(path)!r}")

    def score_sampler(
        self,
        model: Any,
        sampler: Any,
        seeds: Sequence[int],
        batch_size: int | None = None,
        *,
        shape: Sequence[int] | None = None,
        class_labels: torch.Tensor | None = None,
        guidance: Any = None,
        device: str | torch.device | None = None,
        on_batch: Callable[[torch.Tensor], None] | None = None,
    ) -> dict[str, float]:
        """Generate the samples of ``seeds`` with ``sampler`` and score them on the fly (nothing is saved).

        Uses :func:`fastsample.sampling.generate_batch` (per-seed noise), so the images are those
        ``sample.py`` would write for the same seeds. ``class_labels`` holds one label per seed.
        Adds ``nfe``, ``sampling_s`` (generation wall time) and ``images_per_s`` to the scores, and
        ``class_accuracy`` (argmax of the extractor's logits == the label) when labels are given.
        ``on_batch`` sees every generated batch (e.g. to keep a preview grid).
        """
        from fastsample.sampling import generate_batch

        seeds = [int(seed) for seed in seeds]
        if not seeds:
            fail("seeds is empty; give e.g. seeds=0-9999")
        batch_size = batch_size or self.batch_size
        check_range("batch_size", batch_size, low=1)
        device = (
            torch.device(device)
            if device is not None
            else next(iter(list(model.parameters()) + list(model.buffers())), torch.zeros(0)).device
        )
        shape = tuple(shape) if shape is not None else getattr(model, "image_shape", None)
        if shape is None:
            fail("the model does not declare its data shape; pass shape=(C, H, W)")
        timer = {"sampling_s": 0.0}

        def batches() -> Iterator[torch.Tensor]:
            for start in range(0, len(seeds), batch_size):
                chunk = seeds[start : start + batch_size]
                labels = None if class_labels is None else class_labels[start : start + batch_size]
                _sync(device)
                begin = time.perf_counter()
                with torch.no_grad():
                    images = generate_batch(sampler, model, chunk, tuple(shape), labels, guidance, device)
                _sync(device)
                timer["sampling_s"] += time.perf_counter() - begin
                if on_batch is not None:
                    on_batch(images)
                yield images.float()

        stats = self.features(batches(), what=f"samples of {getattr(sampler, 'name', 'the sampler')}")
        return self.sampler_scores(stats, sampler, seeds, class_labels, timer["sampling_s"])

    def sampler_scores(
        self,
        stats: FeatureStats,
        sampler: Any,
        seeds: Sequence[int],
        class_labels: torch.Tensor | None,
        sampling_s: float,
    ) -> dict[str, float]:
        """:meth:`score_stats` of generated samples plus ``class_accuracy``, ``nfe``, ``sampling_s``,
        ``images_per_s`` (shared by :meth:`score_sampler` and the distributed path)."""
        results = self.score_stats(stats)
        if class_labels is not None and stats.logits is not None and len(stats.logits) == len(seeds):
            # Conditional samples: how often the extractor's classifier agrees with the label asked for.
            predicted = np.asarray(stats.logits).argmax(axis=1)
            results["class_accuracy"] = float((predicted == class_labels.cpu().numpy()).mean())
        results["nfe"] = getattr(sampler, "nfe", None)
        results["sampling_s"] = round(sampling_s, 4)
        results["images_per_s"] = round(len(seeds) / sampling_s, 2) if sampling_s > 0 else None
        return results


def _batch_count(images: Any, batch_size: int) -> int | None:
    """Batches :func:`iter_batches` will yield, when known up front (for the progress bar)."""
    if isinstance(images, (torch.Tensor, np.ndarray)):
        return -(-len(images) // batch_size)
    loader_size = getattr(images, "batch_size", None)  # a DataLoader: its batches, if not larger
    if loader_size is not None and loader_size <= batch_size and hasattr(images, "__len__"):
        return len(images)
    return None


def equal_size_subset(features: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """At most ``count`` rows of ``features``, a seeded random subset when there are more.

    Precision / recall compare k-NN manifolds, whose balls shrink as a set grows: with equal-size sets
    (as Kynkaanniemi et al. use them) neither score is inflated by the other set's size. It also keeps
    the cost at ``count^2`` distances when a few samples meet a large reference.
    """
    if len(features) <= count:
        return features
    return features[np.sort(np.random.default_rng(seed).permutation(len(features))[:count])]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------------
# Reading samples


def load_npz_images(path: str | os.PathLike) -> np.ndarray:
    """The uint8 (N, H, W, C) images of a samples ``.npz``; fails naming what is missing or wrong."""
    path = Path(path)
    if not path.is_file():
        fail(f"samples={str(path)!r} does not exist; give a samples.npz (from sample.py) or an image folder")
    try:
        with np.load(path, allow_pickle=False) as data:
            key = next((k for k in SAMPLE_KEYS if k in data.files), None)
            if key is None:
                fail(
                    f"samples={str(path)!r} lacks an 'images' array "
                    f"(has: {', '.join(data.files) or 'nothing'}); "
                    "expected sample.py's samples.npz with images uint8 (N, H, W, C)"
                )
            images = data[key]
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        fail(f"samples={str(path)!r} is not a readable .npz: {err}")
    if images.dtype != np.uint8:
        fail(
            f"samples={str(path)!r}: images are {images.dtype}, expected uint8 (N, H, W, C) in [0, 255] "
            "as sample.py writes them"
        )
    check_image_batch(images, f"samples {str(path)!r}")
    return images


def list_image_files(path: str | os.PathLike) -> list[Path]:
    """Image files under ``path`` (recursively), sorted."""
    path = Path(path)
    if not path.is_dir():
        fail(f"samples={str(path)!r} is not a folder or a .npz file")
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        fail(f"samples={str(path)!r} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def iter_folder_images(path: str | os.PathLike, batch_size: int = 250) -> Iterator[np.ndarray]:
    """uint8 (B, H, W, C) batches of the images under a folder; grayscale iff the first image is."""
    from PIL import Image

    files = list_image_files(path)
    with Image.open(files[0]) as first:
        mode = "L" if first.mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB"
        size = first.size
    for start in range(0, len(files), batch_size):
        batch = []
        for file in files[start : start + batch_size]:
            try:
                with Image.open(file) as image:
                    if image.size != size:
                        fail(
                            f"image {str(file)!r} is {image.size[0]}x{image.size[1]}, but {str(files[0])!r} "
                            f"is {size[0]}x{size[1]}; all samples must have one size"
                        )
                    pixels = np.asarray(image.convert(mode))
            except OSError as err:
                fail(f"image {str(file)!r} cannot be read: {err}")
            batch.append(pixels[..., None] if pixels.ndim == 2 else pixels)
        yield np.stack(batch)


# --------------------------------------------------------------------------------------------------
# The job behind evaluate.py


def build_evaluator(cfg: Any, device: torch.device | None = None) -> Evaluator:
    """An :class:`Evaluator` (no reference yet): ``cfg.metrics`` the extractor, ``cfg.evaluator`` settings."""
    from fastsample.utils.instantiation import instantiate

    extractor = instantiate(cfg.metrics)
    if isinstance(extractor, nn.Module) and not isinstance(extractor, FeatureExtractor):
        fail(
            f"metrics: {type(extractor).__name__} is not a feature extractor; "
            "use metrics=module with metrics.module._target_=<your module>"
        )
    settings = dict(cfg.get("evaluator") or {})
    settings.setdefault("batch_size", cfg.get("batch_size", 250))
    settings.setdefault("progress", bool(cfg.get("progress", False)))
    return Evaluator(extractor, None, device=device, **settings)


def dataset_key(dataset_cfg: Any) -> str:
    """A short hash of the dataset settings that change its images (not batch size / workers / flips)."""
    from omegaconf import OmegaConf

    node = dataset_cfg if isinstance(dataset_cfg, dict) else OmegaConf.to_container(dataset_cfg, resolve=True)
    ignored = {"batch_size", "num_workers", "hflip", "seed", "download"}
    kept = {key: value for key, value in node.items() if key not in ignored}
    return hashlib.sha1(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:10]


def reference_datamodule(cfg: Any) -> Any:
    """The ``cfg.dataset`` DataModule without training augmentation (reference images are not flipped)."""
    from fastsample.utils.instantiation import instantiate

    overrides = {"hflip": False} if "hflip" in cfg.dataset else {}
    return instantiate(cfg.dataset, **overrides)


def prepare_reference(cfg: Any, evaluator: Evaluator) -> Reference:
    """``cfg.ref`` if given, else the stats of ``cfg.dataset`` / ``cfg.split``, cached in ``paths.cache_dir``.

    The cache file name carries the data set, split, extractor name and a hash of the dataset settings,
    so another extractor or another data configuration never picks up a stale file.
    """
    if cfg.get("ref"):
        return read_reference(cfg.ref)
    extractor = evaluator.extractor
    label = (
        extractor.name
        if extractor.weights_hash in extractor.name
        else (f"{extractor.name}-{extractor.weights_hash}")
    )
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", label)
    cache = (
        Path(cfg.paths.cache_dir)
        / "references"
        / f"{cfg.dataset.get('name', 'data')}-{cfg.split}-{dataset_key(cfg.dataset)}-{name}.npz"
    )
    if cache.is_file():
        ref = read_reference(cache)
        if (ref.features is not None or evaluator.keep_features == 0) and ref.extractor == extractor.name:
            return ref
    log.info(
        "building reference statistics of %s/%s with %s (once; cached at %s)",
        cfg.dataset.get("name", "data"),
        cfg.split,
        extractor.name,
        cache,
    )
    return evaluator.build_reference(reference_datamodule(cfg), split=cfg.split, path=cache)


def score_samples_path(evaluator: Evaluator, samples: str | os.PathLike) -> dict[str, float]:
    """Score a ``.npz`` of samples or a folder of images."""
    path = Path(samples)
    if path.is_dir():
        return evaluator.score_folder(path)
    return evaluator.score_npz(path)


def generate_and_score(
    cfg: Any, evaluator: Evaluator, device: torch.device
) -> tuple[dict[str, float] | None, dict]:
    """Sample ``cfg.seeds`` with ``cfg.model`` + ``cfg.sampler`` (sample.py's building blocks) and score;
    writes the first ``grid_size`` samples to ``<output_dir>/grid.png``.

    With ``cfg.trainer`` the seeds are sharded over Lightning processes (:mod:`fastsample.lit.sampling`);
    the metrics are then ``None`` on ranks other than 0.
    """
    from fastsample.sampling import build_guidance, build_model, data_shape, describe_run, labels_for
    from fastsample.utils.instantiation import instantiate
    from fastsample.utils.seeding import parse_seeds

    seeds = parse_seeds(cfg.seeds)
    if not seeds:
        fail("seeds is empty; give e.g. seeds=0-9999")
    sampler = instantiate(cfg.sampler)
    model = build_model(cfg, device)
    if cfg.get("precision", "float32") == "float64":
        model = model.double()
    shape = data_shape(cfg, model)
    labels = labels_for(seeds, cfg.get("class_labels"), getattr(model, "num_classes", None))
    preview = PreviewGrid(cfg.get("grid_size", 64))
    settings = {"shape": shape, "class_labels": labels, "guidance": build_guidance(cfg), "on_batch": preview}
    if cfg.get("trainer"):  # seeds and feature statistics over Lightning processes; None on ranks > 0
        from fastsample.lit.sampling import score_sampler_distributed

        metrics = score_sampler_distributed(
            cfg.trainer, evaluator, model, sampler, seeds, cfg.batch_size, **settings
        )
    else:
        metrics = evaluator.score_sampler(model, sampler, seeds, cfg.batch_size, device=device, **settings)
    info = {
        **describe_run(sampler, model),
        "seeds": f"{seeds[0]}..{seeds[-1]} ({len(seeds)})",
    }
    if metrics is not None:
        preview.save(Path(cfg.output_dir) / "grid.png")
    return metrics, info


class PreviewGrid:
    """Keeps the first ``count`` generated images (image data only) as uint8 for ``grid.png``."""

    def __init__(self, count: int) -> None:
        self.count = int(count)
        self.images: list[np.ndarray] = []

    def __call__(self, images: torch.Tensor) -> None:
        kept = sum(len(batch) for batch in self.images)
        if images.ndim == 4 and kept < self.count:
            from fastsample.utils.images import to_uint8

            self.images.append(to_uint8(images[: self.count - kept].detach().float()))

    def save(self, path: Path) -> Path | None:
        """Write the grid (nothing for non-image data); returns the path written, if any."""
        if not self.images:
            return None
        from fastsample.utils.images import save_grid

        save_grid(np.concatenate(self.images), path)
        return path


def log_to_loggers(cfg: Any, metrics: dict[str, Any], info: dict[str, Any]) -> None:
    """Send the resolved config and run info (hyperparameters), ``eval/<name>`` metrics and the sample
    grid (mode=generate) to the configured loggers (:func:`fastsample.tracking.log_job`)."""
    from fastsample.tracking import log_job

    grid = {"eval/samples": Path(cfg.output_dir) / "grid.png"} if cfg.get("mode") == "generate" else None
    log_job(cfg, metrics, "eval", info=info, images=grid)


def evaluate(cfg: Any) -> dict[str, Any]:
    """Run the evaluation job (``mode=ref|score|generate``); returns the summary (metrics.json's content).

    - ``ref``: reference statistics of ``dataset``/``split`` written to ``ref`` (default
      ``<output_dir>/reference.npz``);
    - ``score``: scores of ``samples`` (a ``.npz`` or an image folder) against ``ref`` (or the dataset's
      cached statistics when ``ref`` is null);
    - ``generate``: samples ``seeds`` with ``model`` + ``sampler`` and scores them on the fly.
    """
    from fastsample.sampling import resolve_device

    check_choice("mode", cfg.mode, MODES)
    check_choice("split", cfg.split, ("train", "test"))
    out_dir = Path(cfg.output_dir)
    device = resolve_device(cfg.device)
    evaluator = build_evaluator(cfg, device)
    started = time.perf_counter()
    if cfg.mode == "ref":
        path = Path(cfg.ref) if cfg.get("ref") else out_dir / "reference.npz"
        ref = evaluator.build_reference(reference_datamodule(cfg), split=cfg.split, path=path)
        return {
            "mode": "ref",
            "reference": str(path),
            "describe": ref.describe(),
            "count": ref.count,
            "kept_features": 0 if ref.features is None else len(ref.features),
            "wall_time_s": round(time.perf_counter() - started, 3),
        }
    if cfg.get("trainer") and cfg.mode != "generate":
        fail(f"trainer= (distributed evaluation) applies to mode=generate, not mode={cfg.mode}; drop trainer")
    evaluator.reference = prepare_reference(cfg, evaluator)
    if cfg.mode == "score":
        if not cfg.get("samples"):
            fail("mode=score needs samples=<samples.npz or image folder>")
        metrics, info = score_samples_path(evaluator, cfg.samples), {"samples": str(cfg.samples)}
    else:
        metrics, info = generate_and_score(cfg, evaluator, device)
        if metrics is None:  # a rank > 0 of a distributed run: rank 0 writes and logs the results
            return {"mode": cfg.mode, "metrics": None, **info}
    summary = {
        "mode": cfg.mode,
        "metrics": metrics,
        **info,
        "extractor": evaluator.extractor.name,
        "reference": evaluator.reference.path,
        "reference_info": evaluator.reference.describe(),
        "device": str(device),
        "wall_time_s": round(time.perf_counter() - started, 3),
        "output_dir": str(out_dir),
    }
    write_json_atomic(out_dir / "metrics.json", summary)
    log_to_loggers(cfg, metrics, info)
    return summary


def format_metrics(metrics: dict[str, Any]) -> str:
    """One line, e.g. ``fid 12.34  kid_mean 0.0012  ...``."""
    parts = []
    for key, value in metrics.items():
        if isinstance(value, float):
            parts.append(f"{key} {value:.6g}")
        elif value is not None:
            parts.append(f"{key} {value}")
    return "  ".join(parts)
