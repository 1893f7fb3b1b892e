"""The tuner (``sample.py mode=tune``, fastsample/jobs/tuning.py) and tuned samplers
(fastsample/samplers/tuned.py) end to end on the digits mixture: file written and loadable (config and
Python), reported samples reproduced, held-out seeds enforced, resume from the cache, selection by the
selection FID, NFE counted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir

import fastsample
from fastsample.diffusion import CountingDenoiser
from fastsample.jobs.sampling import generate
from fastsample.jobs.setup import plan
from fastsample.jobs.tuning import tune
from fastsample.jobs.tuning_candidates import ending_at_zero
from fastsample.jobs.tuning_scores import build_space, halving_survivors
from fastsample.samplers.base import BaseSampler
from fastsample.samplers.ggdm import GGDMSampler
from fastsample.samplers.tuned import TunedSampler, ggdm_learned_state, load_sampler, save_tuned_file
from fastsample.utils.errors import UserError
from fastsample.utils.instantiation import instantiate

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("single_thread")

#: a small tuning problem: two solvers, four families, two finals, short GITS / AYS / quality searches
TUNE = [
    "model=gmm_digits",
    "dataset=digits",
    "class_labels=cycle",
    "device=cpu",
    "mode=tune",
    "batch_size=64",
    "tune.nfe=[4]",
    "tune.progress=false",
    # two solvers, four families (x two finals): drop the others from conf/tune/default.yaml
    *(f"~tune.solvers.{label}" for label in ("dpmpp_3m", "unipc_3", "deis_2", "deis_3", "ipndm")),
    *(
        f"~tune.schedules.{label}"
        for label in ("karras_rho3", "quadratic", "linspace", "trailing", "leading", "leading_ms")
        + ("karras_80", "karras_rho3_80", "loglinear_80", "loglinear_30", "karras_rho3_30")
    ),
    "tune.screen.top=2",
    "tune.screen.solvers=[dpmpp_2m,unipc_2]",
    "tune.rounds=[32,96]",
    "tune.select_seeds=300000-300095",
    "tune.report_seeds=0-95",
    "tune.search_seeds=100000-100015",
    "tune.search.candidates=12",
    "tune.search.top=1",
    "tune.search.ays.iterations=2",
    "tune.search.quality.iterations=2",
    "tune.search.quality.samples=16",
    "tune.search.quality.validation_seeds=500000-500031",
    "tune.search.ggdm.iterations=2",
    "tune.search.ggdm.samples=16",
    "tune.search.ggdm.validate_every=1",
    "~tune.report_features.classifier",  # the shipped classifier is for 28x28 Fashion-MNIST
    "~tune.report_features.inception",
    "+features@tune.report_features.pixels=pixels",
]


def tune_config(root: Path, *overrides: str):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose(
            "sample",
            overrides=[
                *TUNE,
                f"paths.cache_dir={root / 'cache'}",
                f"model.cache_dir={root / 'cache'}",
                f"output_dir={root / 'run'}",
                *overrides,
            ],
        )


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """One tuning run: (config, summary, tuned-sampler file content)."""
    root = tmp_path_factory.mktemp("tune")
    cfg = tune_config(root)
    (summary,) = tune(cfg)
    return cfg, summary, yaml.safe_load(Path(summary["path"]).read_text())


def test_the_job_writes_a_tuned_sampler_file(tuned):
    cfg, summary, content = tuned
    assert Path(summary["path"]).name == "tuned-nfe4.yaml"
    assert content["format"] == "fastsample-tuned/1" and content["nfe"] == 4
    assert (
        content["solver"] in ("dpmpp_2m", "unipc", "ggdm") and content["model"]["class"] == "GaussianMixture"
    )
    assert content["selection"]["features"]["features"].startswith("random_conv1")
    assert set(content["report"]["scores"]["fid"]) == {"random_conv0", "pixels", "select"}
    assert "inception" not in content["report"]["features"]
    keys = [row["key"] for row in content["candidates"]]
    assert len(keys) == len(set(keys))
    for method in (
        "gits",
        "ays",
        "quality",
        "ggdm",
    ):  # searched for the leading solver, scored like the others
        (row,) = [row for row in content["candidates"] if row["key"].endswith(f"/{method}")]
        # (a search that keeps its start grid draws the leader's samples: skipped as a repeat)
        scored = "32" in row.get("selection", {}) or row["reason"].startswith("same samples as")
        assert row["schedule"]["method"] == method and scored
    # the screening stage ran every family x final with both solvers; skipped pairs say why
    assert "dpmpp_2m/default/karras+sigma_min" in keys
    assert all(row["reason"] for row in content["candidates"] if row["status"] == "skipped")
    # a knob that is inert on a grid (lower_order_final when the last step returns the denoised
    # estimate) draws the same samples as the plain solver: found before any seed set is spent
    repeats = [row for row in content["candidates"] if row.get("reason", "").startswith("same samples as")]
    assert repeats and all(row["reason"].removeprefix("same samples as ") in keys for row in repeats)
    assert all("selection" not in row for row in repeats)


def test_the_selected_candidate_is_the_best_on_selection_fid(tuned):
    _, summary, content = tuned
    last = str(content["selection"]["rounds"][-1])
    finalists = [row for row in content["candidates"] if last in row.get("selection", {})]
    best = min(finalists, key=lambda row: row["selection"][last]["fid"])
    assert best["key"] == content["candidate"] == summary["best"].key
    assert content["selection"]["fid"] == best["selection"][last]["fid"]
    assert best["sigmas"] == content["sigmas"]
    # successive halving: everything dropped after the first round scored no better there than any survivor
    dropped = [
        row["selection"]["32"]["fid"] for row in content["candidates"] if row["status"].startswith("dropped")
    ]
    assert dropped and min(dropped) >= max(row["selection"]["32"]["fid"] for row in finalists)


def test_report_seeds_must_be_held_out(tmp_path):
    for overlap, setting in (
        ("tune.report_seeds=300000-300009", "select"),
        ("tune.report_seeds=100010-100020", "search"),
    ):
        with pytest.raises(UserError, match=f"report_seeds overlap tune.{setting}"):
            tune(tune_config(tmp_path, overlap))


def test_the_file_loads_by_config_and_by_python(tuned):
    cfg, _, content = tuned
    path = cfg.output_dir + "/tuned-nfe4.yaml"
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        sampler_cfg = compose("sample", overrides=["sampler=tuned", f"sampler.path={path}"]).sampler
    by_config, by_python = instantiate(sampler_cfg), fastsample.load_sampler(path)
    for sampler in (by_config, by_python):
        assert isinstance(sampler, BaseSampler) and isinstance(sampler, TunedSampler)
        assert sampler.nfe == 4 and sampler.solver == content["solver"]
        assert sampler.sigmas(None).tolist() == content["sigmas"]
    with pytest.raises(UserError, match="sampler.steps=9"):
        load_sampler(path, steps=9)


def tuned_sample_config(cfg, *overrides: str):
    """sample.py's config with the tuning run's file (``sampler=tuned``) on its model and labels."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose(
            "sample",
            overrides=[
                "model=gmm_digits",
                "class_labels=cycle",
                "device=cpu",
                f"model.cache_dir={cfg.paths.cache_dir}",
                f"paths.cache_dir={cfg.paths.cache_dir}",
                "sampler=tuned",
                f"sampler.path={cfg.output_dir}/tuned-nfe4.yaml",
                *overrides,
            ],
        )


def test_the_tuned_sampler_reproduces_the_reported_samples(tuned):
    """sample.py's setup with sampler=tuned gives the report's held-out FID to float rounding."""
    cfg, _, content = tuned
    sample_cfg = tuned_sample_config(
        cfg, "dataset=digits", "batch_size=64", f"seeds={content['report']['seeds']}"
    )
    setup = plan(sample_cfg)
    space = build_space(sample_cfg, "pixels", cfg.tune.report_features.pixels, "test", setup.device)
    fid = setup.score(space.evaluator)["fid"]
    assert fid == pytest.approx(content["report"]["scores"]["fid"]["pixels"]["fid"], rel=1e-6)


def test_nfe_spent_is_the_budget(tuned, tmp_path):
    """Counted model calls per batch equal the budget: in the tuner, in sample.py's run.json, in Python."""
    cfg, _, content = tuned
    assert content["report"]["scores"]["nfe_counted"] == 4
    assert all(
        s.get("nfe_counted", 4) == s["nfe"] == 4
        for r in content["candidates"]
        for s in r.get("selection", {}).values()
    )
    sample_cfg = tuned_sample_config(cfg, "seeds=0-7", f"output_dir={tmp_path}")
    path = sample_cfg.sampler.path
    summary = generate(sample_cfg)
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["nfe"] == summary["nfe"] == 4 and run["sampler"] == "tuned"
    assert run["knobs"]["solver"] == content["solver"]
    counting = CountingDenoiser(plan(sample_cfg).model)
    sampler = load_sampler(path)
    out = sampler.sample(counting, torch.randn(3, 1, 8, 8), cond={"class_labels": torch.arange(3)})
    assert counting.calls == sampler.nfe == 4 and out.shape == (3, 1, 8, 8)


def test_rerun_reuses_the_cached_candidates(tuned):
    cfg, summary, content = tuned
    (again,) = tune(cfg)
    assert again["timing"]["sample_evaluations"] == 0 and again["timing"]["model_calls"] == 0
    assert again["best"].key == summary["best"].key
    assert yaml.safe_load(Path(again["path"]).read_text())["candidates"] == content["candidates"]


def test_tuned_sampler_runs_on_any_denoiser(tmp_path, toy_gmm):
    """A file made by hand (or for another model) runs on a 2-d mixture: the grid is explicit."""
    path = save_tuned_file(
        tmp_path / "t.yaml", {"nfe": 3, "solver": "dpmpp_2m", "knobs": {}, "sigmas": [80.0, 2.0, 0.1, 0.0]}
    )
    sampler = load_sampler(path)
    noise = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    first, second = sampler.sample(toy_gmm, noise), sampler.sample(toy_gmm, noise)
    assert torch.equal(first, second) and first.shape == (5, 2) and sampler.nfe == 3
    ending = save_tuned_file(
        tmp_path / "s.yaml", {"solver": "dpmpp_2m", "knobs": {}, "sigmas": [80.0, 2.0, 0.1, 0.02]}
    )
    assert load_sampler(ending).nfe == 3  # a grid ending at sigma_min: three full steps
    with pytest.raises(UserError, match="strictly decreasing"):
        save_tuned_file(tmp_path / "bad.yaml", {"solver": "dpmpp_2m", "sigmas": [1.0, 2.0, 0.0]})
    with pytest.raises(UserError, match="no such tuned-sampler file"):
        load_sampler(tmp_path / "missing.yaml")


def test_a_learned_ggdm_sampler_round_trips_through_a_tuned_file(tmp_path, toy_gmm):
    """The tuner's GGDM candidate is written as settings + parameters; the file runs the very sampler."""
    ggdm = GGDMSampler([80.0, 5.0, 0.5, 0.0], learn_noise=False)
    with torch.no_grad():  # some learned-looking parameters, not the DDIM start
        for parameter in ggdm.parameters():
            parameter.copy_(0.1 * torch.randn(parameter.shape, dtype=parameter.dtype))
    content = {"solver": "ggdm", "knobs": ggdm.settings(), "sigmas": ggdm.sigmas().tolist()}
    path = save_tuned_file(tmp_path / "g.yaml", {**content, "learned": ggdm_learned_state(ggdm)})
    sampler = load_sampler(path)
    noise = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sampler.sample(toy_gmm, noise), ggdm.sample(toy_gmm, noise))
    assert sampler.nfe == 3 and sampler.knobs["solver"] == "ggdm"
    with pytest.raises(UserError, match="needs 'learned'"):
        save_tuned_file(tmp_path / "bare.yaml", content)
    moved = {**content, "sigmas": [80.0, 4.0, 0.5, 0.0], "learned": ggdm_learned_state(ggdm)}
    with pytest.raises(UserError, match="not the learned GGDM levels"):
        save_tuned_file(tmp_path / "moved.yaml", moved)


def test_searches_start_from_the_leaders_grid_ending_at_zero():
    """A leader on a grid ending at sigma_min (final_sigmas_type) once made AYS and the quality search
    fail ("must end at 0"); they start from its grid with the last level at 0, same step count."""
    grid = torch.tensor([80.0, 5.0, 0.5, 0.002], dtype=torch.float64)
    assert ending_at_zero(grid).tolist() == [80.0, 5.0, 0.5, 0.0] and grid[-1] == 0.002
    assert ending_at_zero(torch.tensor([80.0, 1.0, 0.0])).tolist() == [80.0, 1.0, 0.0]


def test_successive_halving_keeps_the_best_and_drops_the_far_worse():
    scores = {"a": 1.0, "b": 1.1, "c": 5.0, "d": 1.2, "e": float("nan"), "f": 1.3, "g": 1.4, "h": 1.5}
    assert halving_survivors(scores, keep=0.25, min_keep=2, drop_ratio=None) == ["a", "b"]
    assert halving_survivors(scores, keep=1.0, min_keep=1, drop_ratio=1.25) == ["a", "b", "d"]
    assert halving_survivors({"x": 3.0}, keep=0.1, min_keep=2, drop_ratio=1.0) == ["x"]
