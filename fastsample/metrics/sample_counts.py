"""The sample counts below which FID, IS and KID are not worth reading, and why.

The scores are computed anyway (a smoke test or a quick comparison at equal counts is legitimate), but
each score under its minimum gets a ``<score>_warning`` entry in the results (``metrics.json``, the
printed line) and a :class:`SampleCountWarning` plus a log line, so a number such as "FID 4.78 from 5
samples" or "IS 1.0 +- 0" never appears without a word. The minimums (``docs/reliability.md``):

- **FID**: more samples than feature dimensions (``N >= d + 1``). With fewer, the sample covariance is
  singular and its square root term is dominated by estimation noise; FID is in any case biased upward
  by about ``1/N``, so FIDs are only comparable at equal sample counts (10,000+ for published numbers).
- **IS**: at least ``is_splits x classes`` samples. IS of a split is ``exp(I(x; y))`` over the split's
  samples, and that mutual information is at most ``log(split size)``: a split smaller than the number
  of classes caps IS at its size (5 samples in 5 splits give exactly 1.0 +- 0).
- **KID**: at least ``kid_subset_size`` samples. KID's estimator is unbiased, but with fewer samples
  every subset is the whole sample set, so ``kid_std`` only reflects the reference's subsets and
  understates the uncertainty.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

log = logging.getLogger(__name__)


class SampleCountWarning(UserWarning):
    """A score computed from fewer samples than its stated minimum."""


def sample_count_warnings(
    count: int,
    scores: dict[str, Any],
    *,
    feature_dim: int | None,
    classes: int | None,
    is_splits: int,
    kid_subset_size: int,
) -> dict[str, str]:
    """``{"fid_warning": why, ...}`` for each computed score (in ``scores``) below its minimum."""
    found: dict[str, str] = {}
    if "fid" in scores and feature_dim and count < feature_dim + 1:
        found["fid_warning"] = (
            f"FID from {count} samples is unreliable: it needs at least {feature_dim + 1} (feature dimension "
            f"{feature_dim} + 1) for a non-singular covariance, and is biased upward by ~1/N: compare FIDs "
            "only at equal sample counts (10000+ for published numbers)"
        )
    if "is_mean" in scores and classes and count < is_splits * classes:
        per_split = count // min(is_splits, count) if count else 0
        found["is_warning"] = (
            f"IS from {count} samples is unreliable: it needs at least {is_splits * classes} (is_splits "
            f"{is_splits} x {classes} classes); splits of {per_split} sample{'s' * (per_split != 1)} cap IS "
            f"at {per_split}"
        )
    if "kid_mean" in scores and count < kid_subset_size:
        found["kid_warning"] = (
            f"KID from {count} samples: fewer than kid_subset_size={kid_subset_size}, so every subset is the "
            "whole sample set and kid_std understates the uncertainty (the mean stays unbiased)"
        )
    return found


def warn_sample_counts(found: dict[str, str]) -> None:
    """Each warning as a :class:`SampleCountWarning` and a log line (the results hold them too)."""
    for message in found.values():
        warnings.warn(message, SampleCountWarning, stacklevel=3)
        log.warning(message)
