"""The :class:`Evaluator`: features of images -> FID / IS / KID / precision-recall against a reference,
behind ``evaluate.py``, the FID training callback, schedule search and the benchmarks.

An :class:`Evaluator` binds a feature extractor (``conf/features``: a domain classifier, Inception or any
module) to reference statistics and turns images into scores::

    evaluator = Evaluator(extractor, reference="refs/fmnist-train.npz")
    evaluator.score_npz("outputs/sample/.../samples.npz")   # {"fid": ..., "kid_mean": ..., ...}

Images stream through in batches (features are folded into float64 running statistics), so memory
does not grow with the number of samples; only a capped sample of raw features (for KID and precision /
recall) and the logits (for IS) are kept. Inputs are validated batch by batch: uint8 ``(N, H, W, C)``
(what ``sample.py`` saves) or float ``(N, C, H, W)`` in [-1, 1] (what a sampler returns).

Reference files are EDM-compatible ``.npz`` (``mu``, ``sigma`` + metadata, see
:mod:`fastsample.metrics.reference`); ours may also hold ``features``, a capped sample of the reference
set's raw features, which KID and precision / recall need. A reference without them (EDM's, clean-fid's)
still gives FID (and IS); KID / PR are then skipped with a warning.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from fastsample.metrics import (
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
from fastsample.metrics.sample_counts import sample_count_warnings, warn_sample_counts
from fastsample.samplers.generation import generate_batch
from fastsample.utils.errors import check_choice, check_range, fail
from fastsample.utils.images import check_image_batch, iter_folder_images, load_npz_images, shape_text
from fastsample.utils.io import save_npz_atomic

SCORES = ("fid", "is", "kid", "pr")
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


def expected_input_shape(extractor: FeatureExtractor) -> tuple[int, int, int] | None:
    """(C, H, W) the extractor's network needs, when it declares one (classifiers do)."""
    module = getattr(extractor, "module", None)
    for attr in ("input_shape", "image_shape"):
        shape = getattr(module, attr, None)
        if shape is not None and len(tuple(shape)) == 3:
            return tuple(int(s) for s in shape)
    return None


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
        started = time.perf_counter()
        log.info("features of %s with %s", what, self.extractor.name)
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
        log.info("%s: %d images in %.1f s", what, stats.count, time.perf_counter() - started)
        return ref

    def _extract_resumable(self, images: Any, what: str, path: str | os.PathLike) -> tuple[FeatureStats, Any]:
        """:meth:`_extract` in parts saved beside ``path``: a rerun after a kill resumes (see
        :mod:`fastsample.metrics.resumable`)."""
        # One bar over the whole set, advanced as images are read (parts computed earlier count too);
        # the per-part extraction runs without a bar of its own.
        with self._bar(_image_count(images), f"features of {what}") as bar:
            return extract_in_parts(
                lambda batches: self._extract(batches, what, bar=_NO_BAR),
                _counted(iter_batches(images, self.batch_size), bar),
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

    def _bar(self, total: int | None, desc: str) -> tqdm:
        """A progress bar in images (total and ETA when the count is known); off unless ``progress``."""
        return tqdm(total=total, desc=desc, unit="img", disable=not self.progress, leave=False)

    def _extract(
        self,
        images: ImageBatch | Iterable[Any],
        what: str,
        *,
        bar: tqdm | None = None,
    ) -> tuple[FeatureStats, tuple | None]:
        """Stream ``images`` through the extractor; ``bar`` (else a bar of its own, with a total when
        ``images`` knows its size) advances per batch."""
        stats = FeatureStats(self.keep_features, self.keep_logits)
        expected = expected_input_shape(self.extractor)
        shape: tuple[int, int, int] | None = None
        if not isinstance(images, (torch.Tensor, np.ndarray, Iterable)):
            fail(
                f"{what}: expected an image array or an iterable of image batches, "
                f"got {type(images).__name__}"
            )

        own_bar = bar is None
        if own_bar:
            bar = self._bar(_image_count(images), f"features of {what}")
        with bar if own_bar else contextlib.nullcontext():
            for batch in iter_batches(images, self.batch_size):
                batch_shape = check_image_batch(batch, what)
                if shape is None:
                    shape = batch_shape
                    self._check_shape(shape, expected, what)
                elif batch_shape != shape:
                    fail(
                        f"{what}: image shape changed from {shape_text(shape)} to {shape_text(batch_shape)} "
                        "(C x H x W) between batches"
                    )
                if len(batch) == 0:
                    continue
                output = self.extractor(batch)
                stats.update(output["features"], output["logits"])
                bar.update(len(batch))
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
                f"{what}: images are {shape_text(shape)} (C x H x W) but the feature extractor "
                f"{self.extractor.name!r} expects {shape_text(expected)}"
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
        found = sample_count_warnings(  # below a score's minimum count: say so, per score (sample_counts.py)
            stats.count,
            results,
            feature_dim=len(stats.mu),
            classes=logits.shape[1] if logits is not None and logits.ndim == 2 else None,
            is_splits=self.is_splits,
            kid_subset_size=self.kid_subset_size,
        )
        warn_sample_counts(found)
        return {**results, **found}

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

        Uses :func:`fastsample.samplers.generation.generate_batch` (per-seed noise), so the images are those
        ``sample.py`` would write for the same seeds. ``class_labels`` holds one label per seed.
        Adds ``nfe``, ``sampling_s`` (generation wall time) and ``images_per_s`` to the scores, and
        ``class_accuracy`` (argmax of the extractor's logits == the label) when labels are given.
        ``on_batch`` sees every generated batch (e.g. to keep a preview grid).
        """
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

        name = getattr(sampler, "name", "the sampler")
        # The bar times sampling (most of the work) and features together: say so, in images with a total.
        with self._bar(len(seeds), f"sampling {name} + features") as bar:
            stats, _ = self._extract(batches(), what=f"samples of {name}", bar=bar)
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


def _image_count(images: Any) -> int | None:
    """Images an array or a DataLoader holds, when known up front (the progress bar's total)."""
    if isinstance(images, (torch.Tensor, np.ndarray)):
        return len(images)
    dataset = getattr(images, "dataset", None)  # a DataLoader: its data set's size
    if dataset is not None and hasattr(dataset, "__len__") and not callable(dataset):
        return len(dataset)
    return None


def _counted(batches: Iterable[Any], bar: tqdm) -> Iterator[Any]:
    """``batches`` unchanged; ``bar`` advances by each batch's size once it has been used."""
    for batch in batches:
        yield batch
        bar.update(len(batch))


#: a bar that shows nothing (extraction inside an outer bar)
_NO_BAR = tqdm(disable=True)


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
