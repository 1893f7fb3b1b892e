"""Streaming ``.npz`` concatenation: merge shard files key by key without loading them all."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fastsample.utils.io import atomic_path, npz_member


def _shard_meta(shards: Sequence[Path]) -> dict[str, tuple[np.dtype, tuple[int, ...], int]]:
    """Per key: dtype, per-row shape and total rows over all shards (checks they agree)."""
    meta: dict[str, tuple[np.dtype, tuple[int, ...], int]] = {}
    for shard in shards:
        with np.load(shard) as data:
            for key in data.files:
                array = data[key]
                dtype, row, rows = meta.get(key, (array.dtype, array.shape[1:], 0))
                if (dtype, row) != (array.dtype, array.shape[1:]):
                    raise ValueError(
                        f"shard {shard} has {key} of {array.dtype}{array.shape[1:]}, expected {dtype}{row}"
                    )
                meta[key] = (dtype, row, rows + len(array))
    return meta


def stream_npz(shards: Sequence[str | os.PathLike], path: str | os.PathLike) -> None:
    """Concatenate the arrays of ``shards`` along axis 0 into one ``.npz`` at ``path`` (atomically).

    Only one shard's array is in memory at a time, so memory stays flat in the number of rows. Members
    carry a fixed timestamp, so the same shards always give the same bytes.
    """
    shards = [Path(s) for s in shards]
    meta = _shard_meta(shards)
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", allowZip64=True) as archive:
        for key, (dtype, row, rows) in meta.items():
            with archive.open(npz_member(key), "w", force_zip64=True) as member:
                header = {
                    "descr": np.lib.format.dtype_to_descr(dtype),
                    "fortran_order": False,
                    "shape": (rows, *row),
                }
                np.lib.format.write_array_header_2_0(member, header)
                for shard in shards:
                    with np.load(shard) as data:
                        member.write(np.ascontiguousarray(data[key]).tobytes())
