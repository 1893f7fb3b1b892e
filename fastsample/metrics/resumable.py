"""Feature statistics of a large image set in resumable parts (reference statistics: ``mode=ref``).

The images are cut into parts of ``part_images`` (whole batches, in the source's order); each part's
:class:`~fastsample.metrics.stats.FeatureStats` is saved atomically as ``<parts_dir>/part-NNNNN.pt``
with a SHA-1 of the part's pixels. A rerun after an interruption still reads every image (a generic
source cannot be skipped into), but runs the extractor only on parts without a file; a part whose
pixels differ from those it was computed from is refused. The parts are merged in order, so the
result is the same, bit for bit, however often the pass was interrupted; with a single part it is
exactly the one-pass result.

Kept raw rows (for KID / precision-recall, IS) are capped over the whole set: a part keeps only the
rows still missing after the parts before it, so the parts hold at most the cap in total.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastsample.metrics.stats import FeatureStats
from fastsample.utils.errors import fail
from fastsample.utils.io import remove_stale_temporaries, save_torch_atomic

PART_FORMAT = "fastsample-feature-part-v1"
#: images per part: a kill loses at most this much extractor work
PART_IMAGES = 5000

Extract = Callable[[Iterable[Any]], tuple[FeatureStats, tuple[int, int, int] | None]]
log = logging.getLogger(__name__)


def parts_dir_for(path: str | os.PathLike) -> Path:
    """Where the parts of the statistics bound for ``path`` are kept while they are computed."""
    path = Path(path)
    return path.with_name(f"{path.name}.parts")


def extract_in_parts(
    extract: Extract,
    batches: Iterable[Any],
    parts_dir: Path,
    identity: Mapping[str, Any],
    *,
    batch_size: int,
    keep_features: int,
    keep_logits: int,
    part_images: int | None = None,
) -> tuple[FeatureStats, tuple[int, int, int] | None]:
    """Statistics of ``batches`` (at most ``batch_size`` images each) computed part by part.

    ``extract`` turns an iterable of batches into ``(stats, (C, H, W))`` (the evaluator's extraction);
    ``identity`` names what makes the features (extractor, its weights): parts made with another
    identity or another partition are discarded. ``part_images`` defaults to :data:`PART_IMAGES`.
    """
    part_images = part_images or PART_IMAGES
    identity = {**identity, "batch_size": batch_size, "part_images": part_images}
    _discard_foreign(parts_dir, identity)
    per_part = max(1, math.ceil(part_images / batch_size))
    total = FeatureStats(keep_features, keep_logits)
    shape: tuple[int, int, int] | None = None
    for index, part in enumerate(_chunks(batches, per_part)):
        path = parts_dir / f"part-{index:05d}.pt"
        stats, part_shape = _part(extract, part, path, identity, total, keep_features, keep_logits)
        if shape is not None and part_shape is not None and part_shape != shape:
            fail(f"image shape changed from {shape} to {part_shape} (C, H, W) between parts of the set")
        shape = shape or part_shape
        total.merge(stats)
    return total, shape


def finish_parts(parts_dir: Path) -> None:
    """Remove the parts once the result they add up to is written."""
    shutil.rmtree(parts_dir, ignore_errors=True)


def _chunks(batches: Iterable[Any], size: int) -> Iterator[Iterator[Any]]:
    """Consecutive groups of ``size`` batches, each an iterator (nothing is held in memory)."""
    iterator = iter(batches)
    while True:
        first = next(iterator, None)
        if first is None:
            return
        group = itertools.chain([first], itertools.islice(iterator, size - 1))
        yield group
        for _ in group:  # a caller that stopped early must not shift the next part
            pass


def _part(
    extract: Extract,
    batches: Iterator[Any],
    path: Path,
    identity: Mapping[str, Any],
    before: FeatureStats,
    keep_features: int,
    keep_logits: int,
) -> tuple[FeatureStats, tuple[int, int, int] | None]:
    """One part's statistics: read from ``path`` when it exists (pixels checked), else computed and saved."""
    digest = hashlib.sha1()
    hashed = _hashing(batches, digest)
    stored = _load_part(path)
    if stored is not None and stored.get("identity") != dict(identity):
        fail(f"statistics part {path} was made with other settings; delete {path.parent} to start over")
    if stored is not None:
        count = sum(len(batch) for batch in hashed)
        if stored["digest"] != digest.hexdigest() or stored["stats"]["count"] != count:
            fail(
                f"the images of part {path.name} differ from those it was computed from (the data changed "
                f"since the interrupted run); delete {path.parent} to start over"
            )
        stats = FeatureStats().load_state_dict(stored["stats"])
        return stats, tuple(stored["shape"]) if stored["shape"] else None
    stats, shape = extract(hashed)
    state = stats.state_dict()
    state["features"] = _rows_within(state["features"], keep_features - len(_kept(before, "features")))
    state["logits"] = _rows_within(state["logits"], keep_logits - len(_kept(before, "logits")))
    content = {
        "format": PART_FORMAT,
        "identity": dict(identity),
        "digest": digest.hexdigest(),
        "shape": list(shape) if shape else None,
        "stats": state,
    }
    save_torch_atomic(path, content)
    return FeatureStats().load_state_dict(state), shape


def _hashing(batches: Iterable[Any], digest: Any) -> Iterator[Any]:
    for batch in batches:
        array = batch.detach().cpu().numpy() if isinstance(batch, torch.Tensor) else np.asarray(batch)
        digest.update(str((array.dtype.str, array.shape)).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
        yield batch


def _kept(stats: FeatureStats, what: str) -> np.ndarray:
    rows = stats.features if what == "features" else stats.logits
    return rows if rows is not None else np.zeros((0, 0))


def _rows_within(rows: list[torch.Tensor], room: int) -> list[torch.Tensor]:
    """The first ``room`` rows of a list of row blocks (what the merged total will keep)."""
    kept: list[torch.Tensor] = []
    for block in rows:
        if room <= 0:
            break
        kept.append(block[:room])
        room -= len(kept[-1])
    return kept


def _load_part(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # not ours or damaged (atomic writes make the latter unlikely)
        fail(
            f"statistics part {path} is unreadable ({type(err).__name__}); delete {path.parent} to start over"
        )
    return stored if isinstance(stored, dict) and stored.get("format") == PART_FORMAT else None


def _discard_foreign(parts_dir: Path, identity: Mapping[str, Any]) -> None:
    """Remove parts made with another extractor or partition (a cache, not a result), and temporaries
    left by killed writers."""
    if not parts_dir.is_dir():
        return
    remove_stale_temporaries(parts_dir)
    first = _load_part(parts_dir / "part-00000.pt")
    if first is not None and first.get("identity") != dict(identity):
        log.info("discarding feature statistics parts in %s: made with other settings", parts_dir)
        shutil.rmtree(parts_dir)
