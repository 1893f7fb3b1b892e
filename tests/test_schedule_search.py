"""Schedule search (GITS / AYS) and schedule files: DP optimum, parametrization, file round trip, refusals."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir

from fastsample.diffusion.schedules import (
    ScheduleSpec,
    load_schedule_file,
    make_sigmas,
    save_schedule_file,
)
from fastsample.jobs.cli import sample_main
from fastsample.jobs.schedule_search import optimize_schedule
from fastsample.samplers import Sampler
from fastsample.schedule_search import (
    LogSigmaSchedule,
    ays_search,
    best_path,
    candidate_sigmas,
    final_rms,
    refine_path,
    step_costs,
    steps_for_nfe,
    teacher_trajectories,
)
from fastsample.utils.errors import UserError
from fastsample.utils.seeding import SeedNoise

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("single_thread")


# -- dynamic programming --------------------------------------------------------------------------
def brute_force(cost: torch.Tensor, steps: int) -> float:
    last = cost.shape[0] - 1
    return min(
        sum(float(cost[a, b]) for a, b in itertools.pairwise((0, *inner, last)))
        for inner in itertools.combinations(range(1, last), steps - 1)
    )


def test_dp_finds_the_known_optimum_of_a_hand_made_cost_matrix():
    inf = float("inf")
    # 5 nodes; the cheap 2-step path 0 -> 2 -> 4 (1 + 1) beats the direct step (10) and the greedy
    # first step 0 -> 1 (0.5), which leads only to expensive steps; with 3 steps 0 -> 1 -> 3 -> 4 wins.
    cost = torch.tensor(
        [
            [inf, 0.5, 1.0, 6.0, 10.0],
            [inf, inf, 5.0, 0.6, 8.0],
            [inf, inf, inf, 3.0, 1.0],
            [inf, inf, inf, inf, 0.7],
            [inf, inf, inf, inf, inf],
        ]
    )
    assert best_path(cost, 1) == ([0, 4], 10.0)
    assert best_path(cost, 2) == ([0, 2, 4], 2.0)
    path, total = best_path(cost, 3)
    assert path == [0, 1, 3, 4] and total == pytest.approx(1.8)
    path, total = best_path(cost, 4)
    assert path == [0, 1, 2, 3, 4] and total == pytest.approx(9.2)


@pytest.mark.parametrize("steps", [1, 2, 3, 5])
def test_dp_matches_brute_force_on_random_costs(steps):
    generator = torch.Generator().manual_seed(steps)
    cost = torch.rand(9, 9, generator=generator, dtype=torch.float64)
    path, total = best_path(cost, steps)
    assert len(path) == steps + 1 and path[0] == 0 and path[-1] == 8
    assert all(a < b for a, b in itertools.pairwise(path))
    assert total == pytest.approx(brute_force(cost, steps))
    assert total == pytest.approx(sum(float(cost[a, b]) for a, b in itertools.pairwise(path)))


def test_dp_refuses_more_steps_than_candidates():
    with pytest.raises(UserError, match="schedule_search.candidates"):
        best_path(torch.rand(4, 4), 4)


def test_refinement_walks_to_the_minimum_without_crossing_neighbours():
    target = [0, 3, 7, 12, 20]
    objective = lambda path: float(sum((a - b) ** 2 for a, b in zip(path, target)))  # noqa: E731
    path, value, evaluations = refine_path([0, 1, 2, 3, 20], objective, sweeps=10, progress=False)
    assert path == target and value == 0.0 and evaluations > 1
    # long ways cost few evaluations: the stride doubles while the moves succeed
    far = [0, 40, 60, 80, 200]
    objective = lambda path: float(sum(abs(a - b) for a, b in zip(path, far)))  # noqa: E731
    path, value, evaluations = refine_path([0, 1, 2, 3, 200], objective, sweeps=10, progress=False)
    assert path == far and evaluations < 80  # one candidate at a time would take > 180


# -- AYS parametrization --------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [1, 2, 5, 10])
def test_ays_parametrization_stays_strictly_decreasing(steps):
    init = make_sigmas(ScheduleSpec(kind="karras"), steps, None)
    schedule = LogSigmaSchedule(init, sigma_floor=0.002)
    generator = torch.Generator().manual_seed(0)
    for scale in (0.0, 1.0, 10.0, 100.0, 1000.0):
        with torch.no_grad():
            schedule.logits.copy_(scale * torch.randn(steps, generator=generator, dtype=torch.float64))
        sigmas = schedule().detach()
        assert sigmas.shape == (steps + 1,) and float(sigmas[0]) == 80.0 and float(sigmas[-1]) == 0.0
        assert bool((sigmas[:-1] > sigmas[1:]).all()), sigmas
        assert float(sigmas[-2]) > 0.002 or steps == 1


def test_ays_parametrization_starts_near_its_initial_grid():
    init = make_sigmas(ScheduleSpec(kind="loglinear", sigma_min=0.01), 6, None)
    sigmas = LogSigmaSchedule(init, sigma_floor=0.002)().detach()
    assert torch.allclose(sigmas[:-1].log(), init[:-1].log(), atol=0.2)


def test_ays_lowers_the_final_error(toy_gmm):
    levels = candidate_sigmas(0.02, 80.0, 12)
    noise = SeedNoise(range(32)).randn((2,), dtype=torch.float64)
    trajectories = teacher_trajectories(toy_gmm, noise, levels, substeps=4, record=False, progress=False)
    sampler = Sampler("dpmpp_2m", 4)
    init = make_sigmas(ScheduleSpec(kind="karras"), 4, toy_gmm)
    sigmas, report = ays_search(
        sampler, toy_gmm, trajectories, init, sigma_floor=0.02, iterations=15, lr=0.1, progress=False
    )
    assert bool((sigmas[:-1] > sigmas[1:]).all()) and float(sigmas[-1]) == 0.0
    achieved = final_rms(sampler, toy_gmm, sigmas, trajectories)
    assert achieved == pytest.approx(min(report["rms_history"]), rel=1e-6)  # the best iterate is kept
    assert achieved < 0.9 * report["rms_history"][0]


# -- GITS costs ----------------------------------------------------------------------------------
def test_step_costs_call_the_model_once_per_level_and_measure_one_step(toy_gmm):
    levels = candidate_sigmas(0.02, 80.0, 8)
    noise = SeedNoise(range(16)).randn((2,), dtype=torch.float64)
    trajectories = teacher_trajectories(toy_gmm, noise, levels, substeps=4, progress=False)
    sampler = Sampler("dpmpp_2m", 3)
    cost, calls = step_costs(sampler, toy_gmm, trajectories, batch_size=8, progress=False)
    assert calls == 2 * len(levels)  # one model call per level and batch: the first call is cached
    forbidden = ~torch.ones(9, 9, dtype=torch.bool).triu(1)
    assert cost.shape == (9, 9) and torch.isinf(cost[forbidden]).all()
    assert torch.isfinite(cost[~forbidden]).all()
    # one entry recomputed by hand: a DDIM step from the teacher state at level 2 to level 5
    x = trajectories.states[2]
    step = Sampler("euler", 1).run(toy_gmm, x, torch.tensor([levels[2], levels[5]]))
    assert float(cost[2, 5]) == pytest.approx(float((step - trajectories.states[5]).pow(2).mean().sqrt()))


def test_steps_for_nfe_follows_the_sampler_rule():
    assert steps_for_nfe(Sampler("dpmpp_2m", 1), 5) == 5
    assert steps_for_nfe(Sampler("heun", 1), 9) == 5
    with pytest.raises(UserError, match="nearest NFE: 9, 11"):
        steps_for_nfe(Sampler("heun", 1), 10)


# -- schedule files ------------------------------------------------------------------------------
SIGMAS = [80.0, 9.123456789012345, 1.0 / 3.0, 0.0123, 0.0]


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_saved_schedule_loads_and_reproduces_the_samples(tmp_path, toy_gmm, suffix):
    path = save_schedule_file(tmp_path / f"s{suffix}", SIGMAS, sampler="dpmpp_2m", nfe=4, method="ays")
    content = load_schedule_file(path)
    assert content["sigmas"] == SIGMAS and content["sampler"] == "dpmpp_2m" and content["steps"] == 4
    noise = SeedNoise(range(8)).randn(toy_gmm.image_shape, dtype=torch.float64)
    from_file = Sampler("dpmpp_2m", 4, schedule={"kind": "file", "path": str(path)})
    explicit = Sampler("dpmpp_2m", 4, schedule={"kind": "explicit", "sigmas": SIGMAS})
    assert torch.equal(from_file.sigmas(toy_gmm), explicit.sigmas(toy_gmm))
    assert torch.equal(from_file.sample(toy_gmm, noise), explicit.sample(toy_gmm, noise))


def write(path: Path, content: dict) -> Path:
    path.write_text(yaml.safe_dump(content))
    return path


@pytest.mark.parametrize(
    ("sigmas", "steps", "message"),
    [
        ([80.0, 10.0, 10.0, 0.0], 3, "strictly decreasing; values 1 and 2"),
        ([80.0, 10.0, 20.0, 0.0], 3, "strictly decreasing"),
        ([80.0, 10.0, 1.0, 0.5], 3, "must end at 0"),
        ([80.0, 10.0, 1.0, 0.0], 5, "holds 3 steps .* sampler.steps=5; set sampler.steps=3"),
        ([80.0, "a", 0.0], 2, "list of numbers"),
        ([80.0, float("nan"), 0.0], 2, "finite"),
    ],
)
def test_bad_schedule_files_are_refused(tmp_path, sigmas, steps, message):
    path = write(tmp_path / "bad.yaml", {"sampler": "euler", "nfe": 3, "sigmas": sigmas})
    with pytest.raises(UserError, match=message):
        make_sigmas(ScheduleSpec(kind="file", path=str(path)), steps)


def test_missing_or_malformed_schedule_files_are_refused(tmp_path):
    with pytest.raises(UserError, match="sampler.schedule.path must name a schedule file"):
        make_sigmas(ScheduleSpec(kind="file"), 3)
    with pytest.raises(UserError, match="no such schedule file"):
        make_sigmas(ScheduleSpec(kind="file", path=str(tmp_path / "missing.yaml")), 3)
    with pytest.raises(UserError, match="has no 'sigmas' list"):
        make_sigmas(ScheduleSpec(kind="file", path=str(write(tmp_path / "x.yaml", {"steps": 3}))), 3)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(UserError, match="not a readable schedule file"):
        make_sigmas(ScheduleSpec(kind="file", path=str(tmp_path / "broken.json")), 3)
    with pytest.raises(UserError, match="strictly decreasing"):
        save_schedule_file(tmp_path / "s.yaml", [1.0, 2.0, 0.0])


def test_schedule_file_is_found_among_the_shipped_schedules(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTSAMPLE_ASSETS", str(tmp_path))
    save_schedule_file(tmp_path / "schedules" / "m" / "s.json", SIGMAS)
    sigmas = make_sigmas(ScheduleSpec(kind="file", path="m/s.json"), 4)
    assert sigmas.tolist() == SIGMAS
    assert json.loads((tmp_path / "schedules" / "m" / "s.json").read_text())["format"].startswith(
        "fastsample"
    )


SHIPPED = sorted((ROOT / "fastsample" / "assets" / "schedules").glob("schedule-*.yaml"))


def test_the_shipped_schedules_cover_two_solvers_at_every_published_nfe():
    found = {(load_schedule_file(p)["sampler"], load_schedule_file(p)["nfe"]) for p in SHIPPED}
    assert {(solver, nfe) for solver in ("dpmpp_2m", "unipc") for nfe in (4, 5, 6, 8, 10)} <= found


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_schedule_loads_by_name_for_its_solver_and_nfe(path):
    """Each file: its sampler at steps_for_nfe(nfe) takes it by bare name; the provenance is complete."""
    content = load_schedule_file(path)
    steps = steps_for_nfe(Sampler(content["sampler"], 1, **content["knobs"]), content["nfe"])
    sigmas = make_sigmas(ScheduleSpec(kind="file", path=path.name), steps)
    assert sigmas.tolist() == content["sigmas"] and content["model"]["name"] == "fmnist_diffusion.pt"
    held = content["metrics"].get("holdout") or content["metrics"]["validation"]
    score = "fid" if content["method"] == "quality" else "rms"
    assert held[score] < held[f"baseline_{score}"]


# -- the entry point ------------------------------------------------------------------------------
def search_config(tmp_path: Path, *overrides: str):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose(
            "sample",
            overrides=[
                "model=gmm_toy",
                "model.name=two_blobs",
                f"output_dir={tmp_path}",
                "device=cpu",
                "mode=optimize_schedule",
                "schedule_search.seeds=0-31",
                "schedule_search.holdout_seeds=100-131",
                "schedule_search.candidates=16",
                "schedule_search.progress=false",
                "schedule_search.ays.iterations=10",
                *overrides,
            ],
        )


@pytest.mark.parametrize(
    ("method", "sampler", "extra"),
    [
        ("gits", "dpmpp_2m", []),
        ("ays", "unipc", []),
        ("ays", "ipndm", ["schedule_search.ays.init=karras"]),
        ("gits", "heun", []),
    ],
)
def test_tiny_search_end_to_end(tmp_path, method, sampler, extra):
    nfe = 5 if sampler == "heun" else 4
    overrides = [f"sampler={sampler}", f"schedule_search.method={method}", f"schedule_search.nfe={nfe}"]
    (summary,) = optimize_schedule(search_config(tmp_path, *overrides, *extra))
    path = tmp_path / f"schedule-{sampler}-nfe{nfe}-{method}.yaml"
    assert summary["path"] == str(path) and path.is_file()
    content = load_schedule_file(path)
    assert content["nfe"] == nfe and content["method"] == method and content["trajectories"] == 32
    assert content["seeds"] == "0-31" and content["model"]["class"] == "GaussianMixture"
    steps = summary["steps"]
    assert Sampler(sampler, steps).nfe == nfe
    loaded = make_sigmas(ScheduleSpec(kind="file", path=str(path)), steps)
    assert loaded.tolist() == summary["sigmas"]
    search = content["metrics"]["search"]
    assert search["rms"] < search["baseline_rms"]


def test_several_nfes_share_one_teacher_and_cost_matrix(tmp_path):
    summaries = optimize_schedule(search_config(tmp_path, "schedule_search.nfe=[2,3,5]"))
    assert [s["nfe"] for s in summaries] == [2, 3, 5]
    assert [len(s["sigmas"]) for s in summaries] == [3, 4, 6]
    reports = [load_schedule_file(s["path"])["report"] for s in summaries]
    assert {r["cost_model_calls"] for r in reports} == {16}  # computed once: 16 levels, one batch
    holdout = [s["metrics"]["holdout"] for s in summaries]
    assert all(h["rms"] < h["baseline_rms"] for h in holdout)


def test_search_refuses_stochastic_samplers_and_overlapping_seeds(tmp_path):
    with pytest.raises(UserError, match="stochastic.*dpmpp_2m"):
        optimize_schedule(search_config(tmp_path, "sampler=ddpm"))
    with pytest.raises(UserError, match="overlap"):
        optimize_schedule(search_config(tmp_path, "schedule_search.holdout_seeds=20-40"))
    with pytest.raises(UserError, match="schedule_search.method='dp' is not allowed"):
        optimize_schedule(search_config(tmp_path, "schedule_search.method=dp"))


def test_sample_py_dispatches_to_the_search(tmp_path):
    """One real command line (Hydra parses the schedule_search group); errors are checked in-process."""
    overrides = [
        "model=gmm_toy",
        f"hydra.run.dir={tmp_path}",
        "device=cpu",
        "mode=optimize_schedule",
        "schedule_search.nfe=3",
        "schedule_search.seeds=0-15",
        "schedule_search.holdout_seeds=null",
        "schedule_search.candidates=10",
        "schedule_search.gits.refine_sweeps=1",
    ]
    done = subprocess.run(
        [sys.executable, str(ROOT / "sample.py"), *overrides], capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert f"written to {tmp_path}/schedule-dpmpp_2m-nfe3-gits.yaml" in done.stdout


def test_unknown_mode_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        sample_main(search_config(tmp_path, "mode=bogus"))
    assert exited.value.code == 2
    expected = "error: mode='bogus' is not allowed; choose one of: generate, optimize_schedule, tune"
    assert capsys.readouterr().err.strip() == expected
