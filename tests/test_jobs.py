"""One setup for every job: the same config gives byte-identical samples through ``sample.py``,
``evaluate.py mode=generate``, schedule search's setup and :func:`fastsample.jobs.setup.plan` itself.

The guided case is the one that used to drift: a guidance task that needs class targets defaults its
labels to ``cycle``; evaluate.py once sampled it without labels while sample.py used them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from fastsample.jobs.evaluation import evaluate
from fastsample.jobs.sampling import generate
from fastsample.jobs.schedule_search import Search, prepare_search
from fastsample.jobs.setup import plan
from fastsample.utils.images import to_uint8

ROOT = Path(__file__).resolve().parents[1]
SEEDS = "0-11"
CASES = {
    "plain": ["sampler=dpmpp_2m", "sampler.steps=4"],
    "guided": ["sampler=dpmpp_2m", "sampler.steps=4", "guidance=gmm_posterior"],
    "stochastic": ["sampler=dpmpp_2m_sde", "sampler.steps=3"],
}


def config(name: str, tmp_path: Path, *overrides: str):
    common = [
        "model=gmm_digits",
        f"model.cache_dir={tmp_path}/cache",
        "dataset=digits",
        f"seeds={SEEDS}",
        "batch_size=5",
        "grid_size=12",
        f"output_dir={tmp_path}/{name}",
    ]
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose(name, overrides=[*common, *overrides])


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_config_same_samples_through_every_job(tmp_path, case):
    settings = CASES[case]
    generate(config("sample", tmp_path, *settings))
    with np.load(tmp_path / "sample" / "samples.npz") as data:
        sampled = data["images"]

    evaluation = config(
        "evaluate",
        tmp_path,
        *settings,
        "mode=generate",
        "features=module",
        "features.module._target_=torch.nn.Flatten",
        f"paths.cache_dir={tmp_path}/cache",
        "evaluator.scores=[fid]",
        "progress=false",
    )
    evaluate(evaluation)
    grid = (tmp_path / "evaluate" / "grid.png").read_bytes()
    assert grid == (tmp_path / "sample" / "grid.png").read_bytes()  # all 12 samples, lossless

    setup = plan(config("sample", tmp_path, *settings))
    with torch.no_grad():
        planned = np.concatenate([to_uint8(setup.generate(batch)) for batch in setup.batches])
    np.testing.assert_array_equal(planned, sampled)


def test_schedule_search_samples_with_the_same_setup(tmp_path, monkeypatch):
    """Schedule search builds its model, guidance and labels through plan() (teachers are mocked away)."""
    monkeypatch.setattr(Search, "teacher", lambda self, seeds, record: None)
    settings = [*CASES["guided"], "schedule_search.method=ays", "schedule_search.ays.init=karras"]
    settings.append(f"schedule_search.seeds={SEEDS}")
    search = prepare_search(config("sample", tmp_path, "mode=optimize_schedule", *settings))
    reference = plan(config("sample", tmp_path, *settings))
    with torch.no_grad():
        for batch in reference.batches:
            torch.testing.assert_close(
                search.setup.generate(batch), reference.generate(batch), rtol=0, atol=0
            )
    assert search.setup.labels_for(range(12)).tolist() == [seed % 10 for seed in range(12)]
