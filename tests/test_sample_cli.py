"""sample.py end to end: outputs, batch-size independence, resumption, and one-line errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from fastsample.jobs.sampling import generate
from fastsample.jobs.setup import plan
from fastsample.utils.errors import NumericalError, UserError
from fastsample.utils.run_state import STATE_FILE

ROOT = Path(__file__).resolve().parents[1]


def sample_config(tmp_path: Path, *overrides: str, model: str = "gmm_digits"):
    """Compose conf/sample.yaml for a tiny mixture model, writing under ``tmp_path``."""
    cache = [f"model.cache_dir={tmp_path}/cache"] if model == "gmm_digits" else []
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose(
            "sample",
            overrides=[f"model={model}", *cache, f"output_dir={tmp_path}/out", "seeds=0-15", *overrides],
        )


def test_outputs_are_complete(tmp_path):
    summary = generate(sample_config(tmp_path, "sampler=heun", "sampler.steps=4", "batch_size=5"))
    out = tmp_path / "out"
    with np.load(out / "samples.npz") as data:
        assert data["images"].shape == (16, 8, 8, 1) and data["images"].dtype == np.uint8
        assert data["seeds"].tolist() == list(range(16))
        assert (data["labels"] == -1).all()
    run = json.loads((out / "run.json").read_text())
    assert run["nfe"] == summary["nfe"] == 7 and run["sampler"] == "heun"
    assert run["images_per_s"] > 0 and (out / "grid.png").stat().st_size > 0
    assert run["schedule"] == "karras" and run["schedule_settings"] == {}


def test_run_json_records_what_rebuilds_the_grid(tmp_path):
    """Not just the kind: spacing, convention and the final level change the grid (diffusers' knobs)."""
    settings = [
        "kind=time_uniform",
        "spacing=trailing",
        "convention=multistep",
        "final_sigmas_type=sigma_min",
    ]
    generate(
        sample_config(
            tmp_path, "sampler=dpmpp_2m", "sampler.steps=4", *(f"sampler.schedule.{s}" for s in settings)
        )
    )
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["schedule"] == "time_uniform"
    assert run["schedule_settings"] == {
        "spacing": "trailing",
        "convention": "multistep",
        "final_sigmas_type": "sigma_min",
    }


#: the batch-size tolerance conf/sample.yaml and the README state: float rounding of batched kernels,
#: below one 8-bit level in float32 (so saved images differ by at most one level, in rare pixels), and
#: ~1e-13 in float64; not bitwise (a kernel's reduction order depends on the batch size)
ONE_LEVEL = 2 / 255


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "ddpm", "edm_sde", "heun"])
def test_same_seeds_same_samples_whatever_the_batch_size(tmp_path, sampler):
    """The random streams are per seed, so only the float rounding of batched kernels differs: the
    saved uint8 images agree except for rare pixels one level apart, as documented."""
    images = []
    for batch in (1, 7, 16):
        generate(
            sample_config(
                tmp_path / str(batch), f"sampler={sampler}", "sampler.steps=5", f"batch_size={batch}"
            )
        )
        with np.load(tmp_path / str(batch) / "out" / "samples.npz") as data:
            images.append(data["images"])
    for other in images[1:]:
        difference = np.abs(images[0].astype(int) - other.astype(int))
        assert difference.max() <= 1 and (difference == 0).mean() > 0.99


@pytest.mark.parametrize(("precision", "tolerance"), [("float32", ONE_LEVEL), ("float64", 1e-9)])
def test_batch_size_changes_samples_by_less_than_the_stated_tolerance(tmp_path, precision, tolerance):
    """The float samples themselves (before 8-bit quantization), across batch sizes 1, 7 and 64."""
    runs = []
    for batch in (1, 7, 64):
        setup = plan(
            sample_config(
                tmp_path,
                "sampler=heun",
                "sampler.steps=5",
                f"batch_size={batch}",
                f"precision={precision}",
                "seeds=0-63",
            )
        )
        runs.append(torch.cat([setup.generate(seeds) for seeds in setup.batches]))
    for other in runs[1:]:
        assert (other - runs[0]).abs().max().item() < tolerance


def test_rerun_generates_only_missing_shards(tmp_path):
    cfg = sample_config(tmp_path, "sampler.steps=3", "batch_size=4")
    generate(cfg)
    shards = sorted((tmp_path / "out" / "shards").iterdir())
    shards[1].unlink()
    summary = generate(cfg)
    assert summary["generated_this_run"] == 4


def test_class_conditional_labels_cycle(tmp_path):
    generate(sample_config(tmp_path, "class_labels=cycle", "sampler.steps=3"))
    with np.load(tmp_path / "out" / "samples.npz") as data:
        assert data["labels"].tolist() == [s % 10 for s in range(16)]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sampler.steps=0", "sampler.steps"),
        ("+sampler.bogus=1", "sampler.bogus"),
        ("sampler.schedule.sigma_min=90", "sigma_min"),
        ("sampler.schedule.kind=cubic", "sampler.schedule.kind"),
        ("shape=[3,8,8]", "shape"),
        ("class_labels=12", "class_labels"),
        ("seeds=[]", "seeds"),
    ],
)
def test_bad_settings_fail_before_writing(tmp_path, override, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[")):
        generate(sample_config(tmp_path, override))
    assert not (tmp_path / "out" / "samples.npz").exists()


def test_non_finite_model_output_is_reported(tmp_path):
    cfg = sample_config(tmp_path, "model.std=nan", model="gmm_toy")
    with pytest.raises(NumericalError, match="non-finite"):
        generate(cfg)
    assert not (tmp_path / "out" / "samples.npz").exists()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "sample.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_cli_user_error_is_one_line_and_nonzero(tmp_path):
    result = run_cli("model=gmm_toy", "sampler.steps=0", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert errors == ["error: sampler.steps=0 is out of range; allowed: [1, inf]"]
    assert "Traceback" not in result.stderr


def test_cli_unknown_sampler_lists_choices(tmp_path):
    result = run_cli("model=gmm_toy", "sampler=nope", f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0
    assert "sampler/nope" in result.stderr and "dpmpp_2m" in result.stderr


# -- a refused run leaves nothing that blocks the corrected rerun ----------------------------------------


@pytest.mark.parametrize(
    "override",
    [
        "sampler.schedule.sigma_min=90",  # sigma_min > sigma_max
        "sampler=restart",  # with an interval above the grid's start (below)
    ],
)
def test_refused_settings_write_nothing_and_the_corrected_rerun_works(tmp_path, override):
    bad = [override] + (["sampler.restart_list=[[0.1,100,2,3]]"] if override == "sampler=restart" else [])
    with pytest.raises(UserError):
        generate(sample_config(tmp_path, *bad))
    out = tmp_path / "out"
    assert not out.exists() or not any(out.iterdir())  # no run_state.json, no shard
    summary = generate(sample_config(tmp_path, "sampler.steps=3"))  # the corrected command, same folder
    assert summary["generated_this_run"] == 16


def test_a_state_without_finished_shards_does_not_bind_the_folder(tmp_path):
    """A run killed before its first shard leaves only run_state.json: nothing can mix, so a rerun
    with other settings takes the folder over (one with shards is refused, tests/test_reliability.py)."""
    cfg = sample_config(tmp_path, "sampler.steps=3")
    generate(cfg)
    out = tmp_path / "out"
    for shard in (out / "shards").iterdir():
        shard.unlink()
    state = json.loads((out / STATE_FILE).read_text())
    assert state["settings"]["sampler.steps"] == 3
    summary = generate(sample_config(tmp_path, "sampler.steps=4"))
    assert summary["generated_this_run"] == 16
    state = json.loads((out / STATE_FILE).read_text())
    assert state["settings"]["sampler.steps"] == 4 and state["attempts"] == 1
