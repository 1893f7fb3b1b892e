"""Per-sample random streams: the same seed gives the same sample whatever the batch size.

Following EDM's per-seed generators, each sample owns a ``torch.Generator`` seeded with its seed;
the initial noise and every noise draw of a stochastic sampler come from that stream. Batching
only stacks rows, so batch size and process count cannot change a sample. Streams live on the CPU
so CPU and GPU runs draw the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from fastsample.utils.errors import fail


class SeedNoise:
    """One CPU generator per sample seed; ``randn_like(x)`` draws row ``k`` from seed ``k``."""

    def __init__(self, seeds: Sequence[int]) -> None:
        self.seeds = [int(seed) for seed in seeds]
        self.generators = [torch.Generator().manual_seed(seed) for seed in self.seeds]

    def __len__(self) -> int:
        return len(self.seeds)

    def randn(
        self, shape: Sequence[int], dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ) -> Tensor:
        """A ``(len(seeds), *shape)`` standard normal tensor."""
        rows = [torch.randn(tuple(shape), generator=gen, dtype=torch.float32) for gen in self.generators]
        return torch.stack(rows).to(device=device, dtype=dtype)

    def randn_like(self, x: Tensor) -> Tensor:
        """Standard normal noise shaped like ``x`` (one row per seed)."""
        if x.shape[0] != len(self.generators):
            raise ValueError(f"batch of {x.shape[0]} rows but {len(self.generators)} seeds")
        return self.randn(x.shape[1:], x.dtype, x.device)


def randn_like(x: Tensor, generator: SeedNoise | torch.Generator | None = None) -> Tensor:
    """Standard normal noise like ``x`` from a :class:`SeedNoise`, a ``torch.Generator`` or the global RNG."""
    if isinstance(generator, SeedNoise):
        return generator.randn_like(x)
    if generator is None:
        return torch.randn_like(x)
    return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)


#: seeds are torch generator seeds: non-negative 64-bit integers
MAX_SEED = 2**63 - 1


def parse_seeds(spec: str | int | Sequence[int], setting: str = "seeds") -> list[int]:
    """Parse ``"0-99"``, ``"0,5,7"``, ``"0-9,20"``, an int count or a list into a list of seeds.

    Anything else (``abc``, a negative count, ``2.5``, a descending range) is a UserError naming
    ``setting``: a wrong seed list must not run (or run nothing) silently.
    """
    if isinstance(spec, bool) or not isinstance(spec, (str, int)) and not _is_sequence(spec):
        _bad_seeds(setting, spec)
    if isinstance(spec, int):
        if spec < 0:
            fail(
                f"{setting}={spec} is not allowed: a count must be >= 0 ({setting}=5 gives seeds 0-4), "
                f"and seeds are >= 0 (write a range as {setting}=0-4)"
            )
        return list(range(spec))
    if not isinstance(spec, str):
        return [_seed(setting, item, spec) for item in spec]
    seeds: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if "-" in part:
            first, _, last = part.partition("-")
            low, high = _seed(setting, first, spec), _seed(setting, last, spec)
            if high < low:
                fail(f"{setting}={spec!r} has the descending range {part}; write it as {high}-{low}")
            seeds.extend(range(low, high + 1))
        elif part:
            seeds.append(_seed(setting, part, spec))
    return seeds


def _is_sequence(value: Any) -> bool:
    """A list-like config value (OmegaConf's ListConfig is no ``Sequence`` subclass)."""
    return hasattr(value, "__len__") and hasattr(value, "__iter__") and not isinstance(value, (str, dict))


def _seed(setting: str, item: Any, spec: Any) -> int:
    """One seed of ``spec``: a non-negative integer (``"7"`` or ``7``), else a UserError."""
    if isinstance(item, bool):
        _bad_seeds(setting, spec)
    try:
        value = int(item.strip()) if isinstance(item, str) else item
    except ValueError:
        _bad_seeds(setting, spec)
    if not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        _bad_seeds(setting, spec)
    return value


def _bad_seeds(setting: str, spec: Any) -> None:
    fail(
        f"{setting}={spec!r} is not a seed list; give a range ({setting}=0-99), a list ({setting}=0,5,9 or "
        f"{setting}=[0,5,9]), or a count ({setting}=100); seeds are integers >= 0"
    )


def labels_for(seeds: list[int], mode: Any, num_classes: int | None) -> torch.Tensor | None:
    """Class labels per seed: ``None`` (unconditional), ``cycle`` (seed mod classes) or a fixed class."""
    if mode is None:
        return None
    if not num_classes:
        fail("class_labels is set but the model is not class-conditional; use class_labels=null")
    if mode == "cycle":
        return torch.tensor([seed % num_classes for seed in seeds])
    if not isinstance(mode, int) or not 0 <= mode < num_classes:
        fail(f"class_labels={mode!r} is not allowed; choose null, cycle or a class in [0, {num_classes - 1}]")
    return torch.full((len(seeds),), mode)
