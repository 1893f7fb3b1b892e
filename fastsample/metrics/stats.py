"""Streaming feature statistics in float64: mean and covariance without holding every feature.

:class:`FeatureStats` folds batches in with Chan et al.'s pairwise update (count, mean and the
*centred* sum of outer products) instead of raw sums: it gives the same numbers as EDM's
``sum x x^T - n mu mu^T`` in exact arithmetic, but without the cancellation that raw sums suffer when
the mean is large next to the spread, and two accumulators (batches, processes) merge exactly.
The covariance is over ``N - 1`` as in EDM / clean-fid / torch-fidelity.

Raw features (for KID and precision / recall) and logits (for the Inception Score) can be kept too, up
to a cap on the number of rows each, as float32 on the CPU: 50k x 2048 float32 is 400 MB, which is the
reason for the cap. The metrics themselves upcast to float64.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from fastsample.utils.errors import NumericalError, fail

ArrayLike = torch.Tensor | np.ndarray


def as_float64(array: ArrayLike, device: torch.device | str | None = None) -> torch.Tensor:
    """A float64 tensor view/copy of a tensor or numpy array (on ``device`` or where it already is)."""
    tensor = torch.as_tensor(array)
    return tensor.to(device=tensor.device if device is None else device, dtype=torch.float64)


def _as_matrix(setting: str, array: ArrayLike) -> torch.Tensor:
    """``array`` as a detached (N, F) tensor; a non-2-D input is a user error naming ``setting``."""
    tensor = torch.as_tensor(array).detach()
    if tensor.ndim != 2:
        fail(f"{setting} must be a 2-D (samples, dims) array, got shape {tuple(tensor.shape)}")
    return tensor


class FeatureStats:
    """Running count, mean and covariance of feature vectors; optionally the raw rows and logits.

    Args:
        keep_features: keep up to this many raw feature rows (for KID, precision / recall); 0 keeps none.
        keep_logits: keep up to this many logit rows (for the Inception Score); 0 keeps none.
    """

    def __init__(self, keep_features: int = 0, keep_logits: int = 0) -> None:
        self.keep_features = int(keep_features)
        self.keep_logits = int(keep_logits)
        self.count = 0
        self._mean: torch.Tensor | None = None
        self._m2: torch.Tensor | None = None  # sum over samples of (x - mean)(x - mean)^T
        self._features: list[torch.Tensor] = []
        self._logits: list[torch.Tensor] = []

    @property
    def dim(self) -> int | None:
        """Feature dimension, or ``None`` before the first update."""
        return None if self._mean is None else self._mean.shape[0]

    def update(self, features: ArrayLike, logits: ArrayLike | None = None) -> FeatureStats:
        """Fold in a (B, F) batch of features (and optionally its (B, K) logits); returns ``self``."""
        features = _as_matrix("features", features)
        if not torch.isfinite(features).all():
            bad = int((~torch.isfinite(features)).any(dim=1).sum())
            raise NumericalError(f"{bad} of {len(features)} feature vectors are not finite (NaN/inf images?)")
        if self.dim is not None and features.shape[1] != self.dim:
            fail(f"feature dimension changed from {self.dim} to {features.shape[1]} between batches")
        if len(features) == 0:
            return self
        batch = features.to(torch.float64)
        batch_mean = batch.mean(dim=0)
        centred = batch - batch_mean
        self._combine(len(batch), batch_mean, centred.T @ centred)
        self._features = _keep(self._features, features, self.keep_features)
        if logits is not None:
            logits = _as_matrix("logits", logits)
            if len(logits) != len(features):
                fail(f"got {len(logits)} logit rows for {len(features)} feature rows")
            self._logits = _keep(self._logits, logits, self.keep_logits)
        return self

    def _combine(self, count: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        """Chan et al.'s pairwise merge of (count, mean, m2) into this accumulator."""
        if self._mean is None:
            self.count, self._mean, self._m2 = count, mean.clone(), m2.clone()
            return
        mean, m2 = mean.to(self._mean.device), m2.to(self._mean.device)
        total = self.count + count
        delta = mean - self._mean
        self._mean = self._mean + delta * (count / total)
        self._m2 = self._m2 + m2 + torch.outer(delta, delta) * (self.count * count / total)
        self.count = total

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Fold another accumulator (another batch range or process) into this one; returns ``self``.

        Across processes: gather every rank's :meth:`state_dict` (``torch.distributed.all_gather_object``)
        and merge them in rank order, so the kept rows keep the sample order.
        """
        if other.count == 0:
            return self
        if self.dim is not None and other.dim != self.dim:
            fail(f"cannot merge feature statistics of dimension {other.dim} into dimension {self.dim}")
        self._combine(other.count, other._mean, other._m2)
        for row in other._features:
            self._features = _keep(self._features, row, self.keep_features)
        for row in other._logits:
            self._logits = _keep(self._logits, row, self.keep_logits)
        return self

    @property
    def mu(self) -> np.ndarray:
        """Mean feature vector, float64 (F,)."""
        self._require(1)
        return self._mean.cpu().numpy()

    @property
    def sigma(self) -> np.ndarray:
        """Sample covariance over N - 1, float64 (F, F); warns when it is singular (N <= F)."""
        self._require(2)
        if self.count <= self.dim:
            warnings.warn(
                f"covariance of {self.dim}-dim features from only {self.count} samples is singular; "
                f"FID needs more than {self.dim} samples to be stable (EDM uses 50000)",
                stacklevel=2,
            )
        return (self._m2 / (self.count - 1)).cpu().numpy()

    def _require(self, needed: int) -> None:
        if self.count < needed:
            fail(f"feature statistics need at least {needed} samples, got {self.count}")

    @property
    def features(self) -> np.ndarray | None:
        """Kept raw features (up to ``keep_features`` rows), float32, or ``None`` if none were kept."""
        return _concat(self._features)

    @property
    def logits(self) -> np.ndarray | None:
        """Kept logits (up to ``keep_logits`` rows), float32, or ``None`` if none were kept."""
        return _concat(self._logits)

    def state_dict(self) -> dict[str, Any]:
        """CPU tensors and ints that :meth:`load_state_dict` restores exactly (``torch.save``-able)."""
        empty = torch.zeros(0, dtype=torch.float64)
        return {
            "count": self.count,
            "keep_features": self.keep_features,
            "keep_logits": self.keep_logits,
            "mean": empty if self._mean is None else self._mean.cpu(),
            "m2": empty if self._m2 is None else self._m2.cpu(),
            "features": [row.cpu() for row in self._features],
            "logits": [row.cpu() for row in self._logits],
        }

    def load_state_dict(self, state: dict[str, Any]) -> FeatureStats:
        """Restore from :meth:`state_dict`; returns ``self``."""
        self.keep_features, self.keep_logits = int(state["keep_features"]), int(state["keep_logits"])
        self.count = int(state["count"])
        self._mean = state["mean"].clone() if self.count else None
        self._m2 = state["m2"].clone() if self.count else None
        self._features, self._logits = list(state["features"]), list(state["logits"])
        return self

    def __repr__(self) -> str:
        return f"FeatureStats(count={self.count}, dim={self.dim})"


def merge_states(states: Iterable[dict[str, Any]]) -> FeatureStats:
    """One accumulator from several :meth:`FeatureStats.state_dict` s, merged in the given order.

    This is the cross-process reduction of distributed evaluation (:mod:`fastsample.lit.sampling`):
    every rank's state is gathered (``all_gather_object``) and merged in rank order. Merging count,
    mean and centred sum of outer products (Chan et al.) is exact, unlike all-reducing raw sums,
    which cancel when the mean is large next to the spread; and when each rank holds a contiguous
    block of the data, the kept raw rows come out in data order, so KID / PR / IS see the same rows
    as a single process.
    """
    merged: FeatureStats | None = None
    for state in states:
        stats = FeatureStats().load_state_dict(state)
        merged = stats if merged is None else merged.merge(stats)
    if merged is None:
        fail("no feature statistics to merge")
    return merged


def _keep(kept: list[torch.Tensor], rows: torch.Tensor, cap: int) -> list[torch.Tensor]:
    """Append ``rows`` (as CPU float32) to ``kept`` without exceeding ``cap`` rows in total."""
    room = cap - sum(len(row) for row in kept)
    if room > 0:
        kept.append(rows[:room].to("cpu", torch.float32))
    return kept


def _concat(rows: list[torch.Tensor]) -> np.ndarray | None:
    return torch.cat(rows).numpy() if rows else None
