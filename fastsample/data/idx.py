"""A small reader for the IDX format of MNIST and Fashion-MNIST (gzip-compressed or plain).

IDX layout: two zero bytes, a type code, the number of dimensions ``d``, then ``d`` big-endian
uint32 sizes, then the data in C order. We read it with numpy alone so the offline Debian copy
(``dataset-fashion-mnist``) works without torchvision's download machinery.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from fastsample.utils.errors import fail

# IDX type codes -> big-endian numpy dtypes.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (``.gz`` or plain) into a native-endian numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        fail(f"{path} is not an IDX file (bad magic number); re-download or reinstall the data set")
    dtype = _IDX_DTYPES[raw[2]]
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        fail(
            f"{path} is truncated: expected {expected} data bytes for shape {shape}, "
            f"found {len(raw) - header}; re-download or reinstall the data set"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def find_idx_file(folder: str | os.PathLike, stem: str) -> Path | None:
    """Return ``folder/stem.gz`` or ``folder/stem`` if either exists (gzip preferred), else None."""
    for name in (f"{stem}.gz", stem):
        candidate = Path(folder) / name
        if candidate.is_file():
            return candidate
    return None
