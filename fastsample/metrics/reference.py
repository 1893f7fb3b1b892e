"""Reference statistics files: EDM-compatible ``.npz`` with ``mu`` and ``sigma`` plus metadata.

The metadata keys (``extractor``, ``weights_hash``, ``dataset``, ``split``, ``count``, ``resolution``) are
0-d numpy string / int arrays, so EDM's ``fid.py`` (which reads only ``mu`` and ``sigma``) still reads
our files, and published files without metadata (EDM's ``cifar10-32x32.npz``, clean-fid's stats) load
with the metadata reported as unknown.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np

from fastsample.metrics.features import FeatureExtractor
from fastsample.metrics.stats import FeatureStats
from fastsample.utils.errors import fail
from fastsample.utils.io import save_npz_atomic

STRING_KEYS = ("extractor", "weights_hash", "dataset", "split")
INT_KEYS = ("count", "resolution")


@dataclasses.dataclass
class ReferenceStats:
    """Mean / covariance of a reference set's features and what made them (``None``: unknown)."""

    mu: np.ndarray
    sigma: np.ndarray
    extractor: str | None = None
    weights_hash: str | None = None
    dataset: str | None = None
    split: str | None = None
    count: int | None = None
    resolution: int | None = None
    path: str | None = None

    def metadata(self) -> dict[str, str | int | None]:
        """The metadata fields (everything except the arrays and the path)."""
        return {key: getattr(self, key) for key in STRING_KEYS + INT_KEYS}

    def describe(self) -> str:
        """One line for logs, e.g. ``cifar10/train (50000 images, 32px, inception-v3-clean)``."""
        meta = {key: "unknown" if value is None else value for key, value in self.metadata().items()}
        return (
            f"{meta['dataset']}/{meta['split']} ({meta['count']} images, {meta['resolution']}px, "
            f"extractor {meta['extractor']}, weights {meta['weights_hash']})"
        )


def save_reference(
    path: str | os.PathLike,
    stats: FeatureStats,
    extractor: FeatureExtractor | str,
    *,
    weights_hash: str | None = None,
    dataset: str | None = None,
    split: str | None = None,
    resolution: int | None = None,
) -> ReferenceStats:
    """Write ``stats`` (mu, sigma, count) and metadata to ``path`` atomically; returns what was written.

    ``extractor`` is the extractor itself (its ``name`` and ``weights_hash`` are recorded) or a name.
    """
    if isinstance(extractor, FeatureExtractor):
        name, weights_hash = extractor.name, weights_hash or extractor.weights_hash
    else:
        name = extractor
    ref = ReferenceStats(
        stats.mu,
        stats.sigma,
        extractor=name,
        weights_hash=weights_hash,
        dataset=dataset,
        split=split,
        count=stats.count,
        resolution=resolution,
        path=str(path),
    )
    # Unknown fields are omitted rather than stored as a sentinel, so "absent" means unknown on load.
    metadata = {key: np.array(value) for key, value in ref.metadata().items() if value is not None}
    save_npz_atomic(path, mu=ref.mu.astype(np.float64), sigma=ref.sigma.astype(np.float64), **metadata)
    return ref


def load_reference(path: str | os.PathLike) -> ReferenceStats:
    """Read a reference ``.npz`` (ours, EDM's or clean-fid's); missing metadata becomes ``None``."""
    path = Path(path)
    if not path.is_file():
        fail(f"reference statistics file {str(path)!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        fail(f"reference statistics file {str(path)!r} is not a readable .npz: {err}")
    missing = [key for key in ("mu", "sigma") if key not in arrays]
    if missing:
        fail(
            f"reference statistics file {str(path)!r} lacks {', '.join(missing)} "
            f"(has: {', '.join(sorted(arrays)) or 'nothing'}); expected keys mu and sigma"
        )
    mu, sigma = arrays["mu"].astype(np.float64), arrays["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        fail(
            f"reference statistics file {str(path)!r}: mu must be (F,) and sigma (F, F), "
            f"got {mu.shape} and {sigma.shape}"
        )
    metadata = {key: _as_str(arrays[key].item()) for key in STRING_KEYS if key in arrays}
    metadata |= {key: int(arrays[key].item()) for key in INT_KEYS if key in arrays}
    return ReferenceStats(mu=mu, sigma=sigma, path=str(path), **metadata)


def _as_str(value: object) -> str:
    # Files written by other tools may hold byte strings (numpy 'S' dtype) rather than unicode.
    return value.decode() if isinstance(value, bytes) else str(value)


def check_compatible(ref: ReferenceStats, extractor: FeatureExtractor) -> None:
    """Refuse reference stats made by another extractor (or other weights); warn when unknown."""
    where = f"reference statistics {ref.path!r}" if ref.path else "reference statistics"
    if ref.extractor is None:
        warnings.warn(
            f"{where} do not record their feature extractor; assuming {extractor.name!r} "
            "(EDM's published files were made with inception-v3-legacy-tf)",
            stacklevel=2,
        )
    elif ref.extractor != extractor.name:
        fail(
            f"{where} were made with extractor {ref.extractor!r}, not {extractor.name!r}; "
            "recompute them with this extractor or choose the matching one"
        )
    if ref.weights_hash is not None and ref.weights_hash != extractor.weights_hash:
        fail(
            f"{where} were made with {ref.extractor} weights {ref.weights_hash}, "
            f"but the extractor's weights hash to {extractor.weights_hash}"
        )
    dim = getattr(extractor, "num_features", None)
    if dim is not None and len(ref.mu) != dim:
        fail(f"{where} have {len(ref.mu)}-dim features, but {extractor.name!r} gives {dim}")
