"""The bad-input catalog (tests/error_catalog.py) against reality and against docs/errors.md.

Each case runs as the user would run it; its message must match the case's pattern, and message and
exit code must be exactly those documented in docs/errors.md. The document must list exactly the
catalog's cases, in order, with their descriptions and commands (regenerate it with
``.venv/bin/python tests/error_catalog.py``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from error_catalog import CASES, DOC, Case, Outcome, parse, render, run_case

from fastsample.models.bundle import ASSETS_ENV


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Data lookups must not depend on the caller's environment (the missing-dataset case needs that).
    monkeypatch.setenv("FASTSAMPLE_DATA", str(tmp_path / "data"))
    monkeypatch.delenv(ASSETS_ENV, raising=False)
    monkeypatch.delenv("FASTSAMPLE_DEBUG", raising=False)


def documented() -> dict[str, Outcome]:
    return parse(DOC.read_text())


def test_document_lists_exactly_the_catalog() -> None:
    outcomes = documented()
    assert list(outcomes) == [case.name for case in CASES], "regenerate: python tests/error_catalog.py"
    assert DOC.read_text() == render([(case, outcomes[case.name]) for case in CASES])


def test_catalog_covers_the_required_inputs() -> None:
    names = {case.name for case in CASES}
    required = {
        "unknown-option",  # unknown config option
        "invalid-steps",  # invalid numeric setting
        "missing-checkpoint",
        "truncated-checkpoint",
        "foreign-checkpoint",
        "wrong-shape",
        "eval-wrong-channels",
        "train-empty-dataset",
        "train-missing-dataset",
        "eval-npz-without-images",
        "eval-reference-other-extractor",
        "model-nan",
        "disk-full",
        # reliability round 2 (issue 22): wrong types, seeds, devices, refused-before-writing, own models
        "wrong-type",
        "fractional-steps",
        "wrong-type-batch-size",
        "fractional-batch-size",
        "wrong-type-schedule",
        "invalid-seeds",
        "negative-seeds",
        "unknown-device",
        "unknown-model-setting",
        "sigma-range",
        "restart-t-max",
        "es-ddpm-t-prime",
        "es-ddpm-prior-shape",
        "inpaint-mask-shape",
        "callable-unimportable",
        "callable-class-without-kwargs",
        "callable-without-shape",
        "callable-wrong-shape",
        "search-worse-than-configured",
        "train-download-offline",
        "eval-too-few-samples",
    }
    assert required <= names


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_case(case: Case, tmp_path: Path) -> None:
    outcome = run_case(case, tmp_path)
    assert re.search(case.message, outcome.message), outcome.message
    assert outcome.exit_code == case.exit_code, outcome
    if case.exit_code == 2:  # a user error is one line, without a traceback
        assert outcome.message.startswith("error: ") and outcome.message.count("error: ") == 1
        assert "Traceback" not in outcome.message
    assert outcome == documented()[case.name], "regenerate: python tests/error_catalog.py"
