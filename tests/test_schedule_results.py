"""What a schedule search hands over: the printed command reproduces the search's model settings (run as
printed, it samples the searched model on the written file), and a schedule that loses to the configured
one on held-out seeds is not the result (``.rejected.yaml``, a warning, the configured schedule kept)."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from fastsample.diffusion.schedules import load_schedule_file
from fastsample.jobs.schedule_search import optimize_schedule

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "schedule_search.seeds=100000-100031",
    "schedule_search.holdout_seeds=200000-200031",
    "schedule_search.candidates=40",
    "schedule_search.progress=false",
]


def test_printed_command_reproduces_the_model_settings(tmp_path: Path) -> None:
    model = [
        "model=callable",
        "model.fn=fastsample.models.gmm.GaussianMixture.toy",
        "model.kwargs={name: ring}",
        "model.sigma_max=60",
    ]
    search = [sys.executable, "sample.py", "mode=optimize_schedule", *model, "schedule_search.nfe=5", *SMALL]
    done = subprocess.run(
        [*search, f"hydra.run.dir={tmp_path}/search"], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("use it: ")]
    command = shlex.split(line.removeprefix("use it: "))
    assert command[:2] == ["python", "sample.py"] and all(item in command for item in model)
    written = load_schedule_file(tmp_path / "search" / "schedule-dpmpp_2m-nfe5-gits.yaml")
    assert written["model"]["fn"] == "fastsample.models.gmm.GaussianMixture.toy"
    assert (
        written["model"]["settings"]["kwargs.name"] == "ring"
        and written["verdict"]["recommended"] == "searched"
    )
    used = subprocess.run(
        [sys.executable, *command[1:], "seeds=0-3", f"hydra.run.dir={tmp_path}/use"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert used.returncode == 0, used.stderr
    run = json.loads((tmp_path / "use" / "run.json").read_text())
    assert run["schedule"] == "file" and run["model"]["fn"] == written["model"]["fn"]
    assert run["model"]["class"] == written["model"]["class"]


def test_a_schedule_worse_than_the_configured_one_is_not_the_result(tmp_path: Path) -> None:
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "sample",
            overrides=[
                f"output_dir={tmp_path}",
                "mode=optimize_schedule",
                "model=gmm_toy",
                "sampler=ipndm",
                "schedule_search.nfe=20",
                "schedule_search.gits.refine_sweeps=0",
                *SMALL,
            ],
        )
    (summary,) = optimize_schedule(cfg)
    holdout = summary["metrics"]["holdout"]
    assert holdout["rms"] > holdout["baseline_rms"]  # the premise: it loses on the held-out seeds
    assert not (tmp_path / "schedule-ipndm-nfe20-gits.yaml").exists()
    rejected = tmp_path / "schedule-ipndm-nfe20-gits.rejected.yaml"
    assert summary["path"] == str(rejected) and rejected.is_file()
    assert load_schedule_file(rejected)["verdict"]["recommended"] == "configured"
    assert "worse than the configured karras schedule on the held-out seeds" in summary["warning"]
    assert "schedule.kind=file" not in summary["command"] and "sampler.steps=20" in summary["command"]
