"""The stated minimum sample counts of FID, IS and KID (fastsample/metrics/sample_counts.py): below them
each score gets a ``<score>_warning`` in the results and a SampleCountWarning; above them, nothing.
The end-to-end case (``evaluate.py mode=score`` on 5 samples) is the catalog's ``eval-too-few-samples``."""

from __future__ import annotations

import numpy as np
import pytest

from fastsample.metrics.sample_counts import SampleCountWarning, sample_count_warnings, warn_sample_counts
from fastsample.metrics.scores import inception_score

SCORES = {"fid": 1.0, "is_mean": 1.0, "kid_mean": 0.0}
SETTINGS = {"feature_dim": 64, "classes": 10, "is_splits": 10, "kid_subset_size": 1000}


def test_each_score_below_its_minimum_is_named_with_why() -> None:
    found = sample_count_warnings(5, SCORES, **SETTINGS)
    assert set(found) == {"fid_warning", "is_warning", "kid_warning"}
    assert "at least 65 (feature dimension 64 + 1)" in found["fid_warning"]
    assert "at least 100 (is_splits 10 x 10 classes)" in found["is_warning"]
    assert "kid_subset_size=1000" in found["kid_warning"]
    with pytest.warns(SampleCountWarning, match="FID from 5 samples"):
        warn_sample_counts(found)


@pytest.mark.parametrize(
    ("count", "expected"),
    [
        (64, {"fid_warning", "is_warning", "kid_warning"}),
        (65, {"is_warning", "kid_warning"}),
        (100, {"kid_warning"}),
    ],
)
def test_minimums_are_the_stated_ones(count: int, expected: set[str]) -> None:
    assert set(sample_count_warnings(count, SCORES, **SETTINGS)) == expected


def test_no_warning_at_or_above_every_minimum_or_for_scores_not_computed() -> None:
    assert sample_count_warnings(1000, SCORES, **SETTINGS) == {}
    assert sample_count_warnings(5, {"fid": 1.0}, **{**SETTINGS, "feature_dim": 2}) == {}


def test_the_is_bound_that_motivates_the_minimum() -> None:
    """IS of a split is at most its size: 5 perfectly confident, all-different samples in 5 splits give
    exactly 1, the value the issue saw; in one split they give 5 (of a possible 10)."""
    logits = np.eye(10)[:5] * 50.0
    assert inception_score(logits, 5)[0] == pytest.approx(1.0)
    assert inception_score(logits, 1)[0] == pytest.approx(5.0, rel=1e-6)
