"""Foreign benchmark models: the diffusers training recipe and the few-step benchmark, end to end.

The recipe's ``--quick`` mode trains tiny class-conditional UNet2DModels on a Fashion-MNIST subset in
seconds; the folders must load with ``model=diffusers`` and sample through ``plan``, a killed run must
resume to the very weights of an uninterrupted one, and ``bench/foreign_models.py --quick`` must score
them in both feature spaces.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from fastsample.jobs import foreign_benchmark, foreign_models
from fastsample.jobs.setup import plan
from fastsample.utils.errors import UserError

diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.usefixtures("single_thread")

CONF = Path(__file__).resolve().parents[1] / "conf"
FMNIST = Path("/usr/share/datasets/fashion-mnist")


def quick(name: str) -> foreign_models.Recipe:
    return foreign_models.quick(foreign_models.RECIPES[name])


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both recipes, quick, via the command-line entry (``--quick``)."""
    out = tmp_path_factory.mktemp("foreign")
    foreign_models.main(["--quick", "--threads", "1", "--out", str(out)])
    return out


@pytest.mark.parametrize("name, prediction", [("eps_linear", "epsilon"), ("v_cosine", "v_prediction")])
def test_quick_recipe_writes_a_pipeline_folder(trained: Path, name: str, prediction: str):
    folder = trained / name
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == prediction
    assert scheduler["num_train_timesteps"] == 1000
    assert scheduler["beta_schedule"] == foreign_models.RECIPES[name].beta_schedule
    unet = json.loads((folder / "unet" / "config.json").read_text())
    assert unet["_class_name"] == "UNet2DModel" and unet["num_class_embeds"] == 10
    info = json.loads((folder / foreign_models.DONE).read_text())
    assert info["steps"] == quick(name).steps and info["seconds_per_step"] > 0


@pytest.mark.parametrize("name", ["eps_linear", "v_cosine"])
def test_folder_loads_with_model_diffusers_and_samples(trained: Path, name: str):
    overrides = [
        "model=diffusers",
        f"model.path={trained / name}",
        "class_labels=cycle",
        "sampler=diffusers",
        "sampler.scheduler=UniPCMultistepScheduler",
        "sampler.steps=3",
        "seeds=0-3",
        "device=cpu",
    ]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("sample", overrides=overrides)
    setup = plan(cfg)
    assert setup.model.num_classes == 10 and setup.shape == (1, 28, 28)
    images = setup.generate(setup.seeds)
    assert images.shape == (4, 1, 28, 28) and torch.isfinite(images).all()


def test_killed_run_resumes_to_the_same_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    recipe = replace(quick("eps_linear"), subset=32)
    foreign_models.train(recipe, tmp_path / "whole")
    real_save = foreign_models.save_checkpoint

    def save_then_die(state, recipe, path):
        real_save(state, recipe, path)
        if state.step == 2:
            raise KeyboardInterrupt  # killed right after the first checkpoint

    monkeypatch.setattr(foreign_models, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        foreign_models.train(recipe, tmp_path / "resumed")
    assert not (tmp_path / "resumed" / foreign_models.DONE).exists()
    monkeypatch.setattr(foreign_models, "save_checkpoint", real_save)
    foreign_models.train(recipe, tmp_path / "resumed")
    whole = diffusers.UNet2DModel.from_pretrained(tmp_path / "whole" / "unet").state_dict()
    resumed = diffusers.UNet2DModel.from_pretrained(tmp_path / "resumed" / "unet").state_dict()
    assert all(torch.equal(whole[key], resumed[key]) for key in whole)


def test_checkpoint_of_another_recipe_is_refused(tmp_path: Path):
    foreign_models.train(quick("eps_linear"), tmp_path)
    (tmp_path / foreign_models.DONE).unlink()
    with pytest.raises(UserError, match="another recipe"):
        foreign_models.train(replace(quick("eps_linear"), lr=1e-4), tmp_path)


def test_unknown_recipe_is_refused():
    with pytest.raises(UserError, match="unknown foreign-model recipe"):
        foreign_models.main(["nope", "--quick"])


def test_quick_benchmark_scores_both_feature_spaces(trained: Path, tmp_path: Path):
    out = tmp_path / "bench"
    models = f"eps={trained / 'eps_linear'},v={trained / 'v_cosine'}"
    argv = ["--quick", "--models", models, "--out", str(out), f"paths.cache_dir={tmp_path / 'cache'}"]
    argv += ["--row", "mine:sampler=dpmpp_2m;sampler.schedule.kind=vp", "--samplers", "euler@loglinear"]
    rows = foreign_benchmark.main(argv)
    labels = {"DDIM", "DPM++2M", "mine", "euler@loglinear", "converged: dpmpp_2m 6 steps"}
    for model in ("eps", "v"):
        mine = [row for row in rows if row["model"] == model]
        assert {row["row"] for row in mine} == labels
        for row in mine:
            assert row["nfe"] == (6 if row["budget"] == 0 else 3)
            assert row["fid_classifier"] > 0 and row["fid_random_conv"] > 0
            assert 0 <= row["class_accuracy"] <= 1
    with (out / "foreign_models.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == len(rows)
    assert (out / "eps" / "grid-converged-dpmpp-2m-6-steps.png").is_file()
    # a rerun finds every row done and samples nothing
    again = foreign_benchmark.main(argv)
    assert [row["fid_classifier"] for row in again] == [row["fid_classifier"] for row in rows]


def test_heun_budget_takes_the_most_steps_that_fit(trained: Path):
    """Heun spends 2 steps - 1 calls: a budget of 4 gets 2 steps (NFE 3), not 3 steps (NFE 5)."""
    base = ["model=diffusers", f"model.path={trained / 'eps_linear'}", "class_labels=cycle"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        model = plan(compose("evaluate", overrides=[*base, "seeds=0-1", "device=cpu"])).model
    heun = next(row for row in foreign_benchmark.DIFFUSERS_DEFAULTS if row.label == "Heun")
    sampler = foreign_benchmark.sampler_for(base, heun, 4, model)
    assert (sampler.steps, sampler.nfe) == (2, 3)
    plms = next(row for row in foreign_benchmark.DIFFUSERS_DEFAULTS if row.label.startswith("PNDM"))
    assert foreign_benchmark.sampler_for(base, plms, 5, model).nfe == 5


def test_checkpoint_from_before_a_new_setting_still_resumes():
    """A recipe setting added later (e.g. snr_gamma) matches an older checkpoint only at its default."""
    saved = {key: value for key, value in asdict(quick("v_cosine")).items() if key != "snr_gamma"}
    assert foreign_models.same_recipe(saved, quick("v_cosine"))
    assert not foreign_models.same_recipe(saved, replace(quick("v_cosine"), snr_gamma=5.0))


def test_rows_of_other_weights_are_not_reused(trained: Path, tmp_path: Path):
    """A retrained model (other weights) in the same folder gets fresh rows, not the old model's."""
    out = tmp_path / "bench"
    argv = ["--quick", "--no-references", "--diffusers", "DDIM", "--out", str(out)]
    argv += ["--models", f"m={trained / 'eps_linear'}", f"paths.cache_dir={tmp_path / 'cache'}"]
    first = foreign_benchmark.main(argv)
    path = out / "m" / "rows.csv"
    path.write_text(path.read_text().replace(first[0]["weights"], "000000000000"))
    second = foreign_benchmark.main(argv)
    assert len(second) == 1 and second[0]["weights"] == first[0]["weights"]


def test_a_failing_sampler_is_a_row_not_the_end(
    trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """diffusers' UniPC + Karras sigmas asserts on the cosine table: the run goes on and the table
    says ``fails``."""

    def broken(*args, **kwargs):
        raise AssertionError("this_order > 0")

    monkeypatch.setattr(foreign_benchmark, "score_both", broken)
    argv = ["--quick", "--no-references", "--diffusers", "DDIM", "--out", str(tmp_path / "bench")]
    argv += ["--models", f"m={trained / 'v_cosine'}", f"paths.cache_dir={tmp_path / 'cache'}"]
    (row,) = foreign_benchmark.main(argv)
    assert row["error"] == "AssertionError: this_order > 0" and row["fid_classifier"] is None
    assert "| DDIM | fails |" in (tmp_path / "bench" / "foreign_models.md").read_text()


def test_targets_table_compares_tuned_with_the_best_diffusers_default():
    """The issue's ratios: against the best *diffusers default* by classifier FID (not a hand-picked
    fastsample row, even a better one) and against the converged run, in both feature spaces."""

    def row(label: str, budget: int, classifier: float, random_conv: float) -> dict:
        return {"row": label, "budget": budget, "fid_classifier": classifier, "fid_random_conv": random_conv}

    rows = [
        row("converged: dpmpp_2m 200 steps", 0, 0.02, 0.2),
        row("UniPC", 5, 0.04, 0.5),
        row("DEIS", 5, 0.05, 0.4),
        row("hand unipc trailing", 5, 0.01, 0.1),
        row(foreign_benchmark.TUNED, 5, 0.02, 0.25),
    ]
    table = foreign_benchmark.targets_table(rows)
    assert "| 5 | UniPC: 0.04 / 0.5 | 0.02 / 0.25 | 0.50 / 0.50 | 1.00 / 1.25 |" in table
