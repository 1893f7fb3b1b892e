"""Atomic file output: write to a temporary name in the same folder, fsync, then rename.

A killed job therefore never leaves a partial file under a final name: either the old file (or
none) or the complete new one is there. Temporary names carry the writer's host and process id
(``.<name>.<host>-<pid>.<random>.tmp``), so a resumed job can remove the leftovers of a killed one
(:func:`remove_stale_temporaries`) without touching files another live process is still writing.
A full disk (or quota / file-size limit) while writing becomes a one-line :class:`UserError` naming
the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import socket
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from fastsample.utils.errors import disk_full_error

#: errors that mean "no room for this output", not a bug: no space, quota, file-size limit
#: member timestamp of every .npz we write: equal arrays give byte-identical files
NPZ_DATE_TIME = (1980, 1, 1, 0, 0, 0)
_TEMPORARY = re.compile(r"^\..+\.(?P<host>[0-9a-f]{8})-(?P<pid>\d+)\.[^.]+\.tmp$")


def _host_tag() -> str:
    """A short, filename-safe tag of this machine (host names may hold dots and dashes)."""
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}.{_host_tag()}-{os.getpid()}."
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp creates 0600; outputs should read like any file
        os.replace(tmp_path, path)
    except OSError as err:
        full = disk_full_error(err, path)
        if full is None:
            raise
        raise full from err
    finally:
        tmp_path.unlink(missing_ok=True)


def remove_stale_temporaries(folder: str | os.PathLike) -> int:
    """Delete temporary files in ``folder`` left by killed writers on this host; returns how many.

    A temporary file is stale when its writer (host tag and pid in the name) is this machine and no
    process with that pid runs. Files of live processes and of other hosts (a shared file system) are
    left alone. A recycled pid only keeps a stale file around; it never deletes a live one.
    """
    folder, host, removed = Path(folder), _host_tag(), 0
    if not folder.is_dir():
        return 0
    for entry in folder.iterdir():
        match = _TEMPORARY.match(entry.name)
        if match is None or match["host"] != host or _alive(int(match["pid"])):
            continue
        entry.unlink(missing_ok=True)
        removed += 1
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def npz_member(key: str) -> zipfile.ZipInfo:
    """The zip entry of array ``key`` in an .npz, with a fixed timestamp (reproducible bytes)."""
    return zipfile.ZipInfo(f"{key}.npy", date_time=NPZ_DATE_TIME)


def write_npz(file: str | os.PathLike | IO[bytes], **arrays: np.ndarray) -> None:
    """``np.savez`` (uncompressed, readable by ``np.load``) with fixed member timestamps.

    ``np.savez`` stamps each member with the current time, so two runs that compute the same arrays
    write different bytes; with a fixed stamp a resumed run's files can be compared by checksum.
    """
    with zipfile.ZipFile(file, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for key, array in arrays.items():
            with archive.open(npz_member(key), "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)


def save_npz_atomic(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """Write an ``.npz`` of ``arrays`` to ``path`` atomically (reproducible bytes, see :func:`write_npz`)."""
    buffer = io.BytesIO()
    write_npz(buffer, **arrays)
    write_bytes_atomic(path, buffer.getvalue())


def save_torch_atomic(path: str | os.PathLike, obj: Any) -> None:
    """``torch.save`` to ``path`` atomically."""

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
