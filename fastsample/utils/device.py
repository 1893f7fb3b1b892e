"""The device a job runs on."""

from __future__ import annotations

import torch

from fastsample.utils.errors import fail


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; otherwise the named device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        fail(f"device={name!r} but no CUDA device is available; use device=cpu or device=auto")
    return torch.device(name)
