"""Short content hashes that identify weights: shared by the metrics and the learned samplers.

A module's hash names a feature extractor in metric caches (``<label>:<hash>``) and ties a learned
sampler to the backbone it was trained for, so it lives here rather than in either package.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

#: hex digits kept of a sha256 digest (48 bits: collisions are not a concern for these uses)
HASH_LENGTH = 12


def module_hash(module: nn.Module, dtype: torch.dtype | None = None) -> str:
    """Short sha256 of a module's state dict (names, dtypes, shapes and values).

    With ``dtype`` floating-point tensors are hashed as that dtype, whatever they are stored in, so a
    model and its ``.double()`` copy share one hash (how learned samplers identify their backbone).
    """
    digest = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        if not isinstance(value, torch.Tensor):
            continue
        value = value.detach().cpu().contiguous()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        digest.update(f"{key}:{value.dtype}:{tuple(value.shape)}".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:HASH_LENGTH]
