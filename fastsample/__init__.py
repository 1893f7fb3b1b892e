"""fastsample: fast sampling of diffusion models behind one denoiser interface.

``fastsample.load_sampler(path)`` loads a tuned-sampler file (``sample.py mode=tune``) as a sampler;
it is resolved on first use (PEP 562), so ``import fastsample`` stays free of torch.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

# torch's OpenMP threads spin between parallel regions unless told otherwise; beside other jobs the spinning
# burns the cores they need (runs 3-13x slower, Makefile). Set before torch loads (importing fastsample
# first, as the entry points do); an explicit OMP_WAIT_POLICY wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

#: public names resolved lazily: name -> the module that defines it
LAZY = {"load_sampler": "fastsample.samplers.tuned"}


def __getattr__(name: str) -> Any:
    if name in LAZY:
        return getattr(importlib.import_module(LAZY[name]), name)
    raise AttributeError(f"module 'fastsample' has no attribute {name!r}")


__all__ = ["load_sampler"]
