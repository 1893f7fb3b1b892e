"""The schedule-search job behind ``python sample.py mode=optimize_schedule`` (see docs/schedules.md).

Builds model and sampler from the same config as sampling, finds the step count that gives the
requested NFE, records teacher trajectories from the search seeds, runs GITS or AYS, compares the
result with the sampler's configured schedule on the search trajectories and on held-out seeds,
and writes the schedule file (sigmas + provenance) atomically into the run directory.
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig, OmegaConf

from fastsample.diffusion.schedules import ScheduleSpec, make_sigmas, save_schedule_file
from fastsample.jobs.evaluation import prepare_reference
from fastsample.jobs.setup import Setup, plan
from fastsample.metrics.evaluator import Evaluator
from fastsample.samplers import SAMPLERS, Sampler
from fastsample.schedule_search.ays import ays_search
from fastsample.schedule_search.gits import gits_search, step_costs
from fastsample.schedule_search.quality import QualityObjective, descent_settings, quality_search
from fastsample.schedule_search.trajectories import (
    Trajectories,
    candidate_sigmas,
    final_rms,
    steps_for_nfe,
    teacher_trajectories,
    with_steps,
)
from fastsample.utils.errors import check_choice, check_range, fail
from fastsample.utils.instantiation import instantiate
from fastsample.utils.run_state import job_settings
from fastsample.utils.seeding import SeedNoise, parse_seeds

log = logging.getLogger(__name__)

METHODS = ("gits", "ays", "quality")
INITS = ("karras", "loglinear", "vp", "gits")


def model_description(cfg: DictConfig, model: Any) -> dict[str, Any]:
    """What the schedule was searched for: the model config's target, its settings (``model.fn`` of a
    callable model, a checkpoint's path, ...) and the model's identity."""
    node = cfg.model
    described = {"config": OmegaConf.select(node, "_target_", default=None)}
    for key in ("name", "path"):
        value = OmegaConf.select(node, key, default=None, throw_on_missing=False)
        if value is not None:
            described[key] = value
    described["settings"] = {
        key: value
        for key, value in job_settings(node).items()
        if not key.startswith(("_", "datamodule.", "cache_dir"))  # the data set is described elsewhere
    }
    if hasattr(model, "identity"):
        described.update(model.identity())
    return described


def sigma_range(sampler: Sampler, model: Any) -> tuple[float, float]:
    """The search range: the sampler's schedule bounds, or the model's trained range (as make_sigmas)."""
    spec = sampler.schedule
    low = spec.sigma_min if spec.sigma_min is not None else getattr(model, "sigma_min", 0.002)
    high = spec.sigma_max if spec.sigma_max is not None else getattr(model, "sigma_max", 80.0)
    if not 0 < low < high:
        fail(f"schedule search needs 0 < sigma_min < sigma_max, got {low} and {high}")
    return float(low), float(high)


def requested_nfes(value: Any, base: Sampler) -> list[int]:
    """``schedule_search.nfe``: null (the sampler's NFE), one value or a list of values."""
    if value is None:
        return [base.nfe]
    values = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
    if not values:
        fail("schedule_search.nfe is an empty list; give e.g. schedule_search.nfe=5 or [4,5,6,8,10]")
    return [int(v) for v in values]


def start_grid(
    kind: str,
    sampler: Sampler,
    model: Any,
    search_set: Trajectories | None,
    cost: Any,
    bounds: tuple[float, float],
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The grid a gradient method starts from: the GITS DP path (no refinement) or a hand-designed one."""
    if kind == "gits":
        return gits_search(sampler, model, search_set, cost=cost, refine_sweeps=0, progress=False)
    spec = ScheduleSpec(kind=kind, rho=sampler.schedule.rho, sigma_min=bounds[0], sigma_max=bounds[1])
    return make_sigmas(spec, sampler.steps, model), {}


def rms_metrics(
    sampler: Sampler,
    model: Any,
    guidance: Any,
    batch_size: int,
    baseline: torch.Tensor,
    sigmas: torch.Tensor,
    search_set: Trajectories,
    holdout: Trajectories | None,
) -> dict[str, Any]:
    """RMS to the teacher of the configured (baseline) and the found grid, on search and held-out sets."""
    sets = {"search": search_set, **({"holdout": holdout} if holdout is not None else {})}
    return {
        name: {
            "trajectories": len(trajectories),
            "baseline_rms": final_rms(
                sampler, model, baseline, trajectories, guidance=guidance, batch_size=batch_size
            ),
            "rms": final_rms(sampler, model, sigmas, trajectories, guidance=guidance, batch_size=batch_size),
        }
        for name, trajectories in sets.items()
    }


def quality_objective(cfg: DictConfig, setup: Setup, sampler: Sampler) -> QualityObjective:
    """KID / FID of ``sampler`` in ``schedule_search.quality.features`` against ``cfg.dataset``.

    The real features and statistics come from the reference cache of evaluate.py (built once).
    """
    settings = cfg.schedule_search.quality
    check_range("schedule_search.quality.real_features", settings.real_features, low=2)
    extractor = instantiate(settings.features).to(setup.device)
    evaluator = Evaluator(extractor, keep_features=10_000, batch_size=cfg.schedule_search.batch_size)
    source = OmegaConf.create(
        {
            "dataset": OmegaConf.to_container(cfg.dataset, resolve=True),
            "split": settings.split,
            "ref": None,
            "paths": {"cache_dir": cfg.paths.cache_dir},
        }
    )
    reference = prepare_reference(source, evaluator)
    if reference.features is None or len(reference.features) < 2:
        fail("schedule_search.quality needs reference statistics with raw features; delete the cached file")
    real = torch.as_tensor(reference.features[: settings.real_features], dtype=torch.float64)
    return QualityObjective(
        sampler=sampler,
        model=setup.model,
        features=extractor,
        real_features=real,
        reference_mu=reference.mu,
        reference_sigma=reference.sigma,
        shape=setup.shape,
        labels=setup.labels_for,
        guidance=setup.guidance,
        batch_size=cfg.schedule_search.batch_size,
        dtype=setup.dtype,
        device=setup.device,
    )


def quality_metrics(
    objective: QualityObjective, seeds_text: Any, seeds: list[int], baseline: torch.Tensor, report: dict
) -> dict[str, Any]:
    """Validation FID of the configured (baseline) grid and of the found one (the seeds that picked it)."""
    return {
        "validation": {
            "seeds": str(seeds_text),
            "baseline_fid": objective.fid(baseline, seeds),
            "fid": report["best_validation_fid"],
        }
    }


@dataclass
class Search:
    """What every NFE of one schedule search shares: the setup, the seed sets, the candidate levels,
    the teacher trajectories and (GITS) the one-step cost matrix."""

    cfg: DictConfig
    setup: Setup
    method: str
    init_kind: str | None
    seeds: list[int]
    holdout_seeds: list[int]
    bounds: tuple[float, float]
    levels: torch.Tensor
    search_set: Trajectories | None = None
    holdout: Trajectories | None = None
    cost: Any = None
    objective: QualityObjective | None = None
    validation_seeds: list[int] = field(default_factory=list)
    shared: dict[str, Any] = field(default_factory=dict)

    @property
    def settings(self) -> DictConfig:
        return self.cfg.schedule_search

    @property
    def base(self) -> Sampler:
        return self.setup.sampler

    @property
    def progress(self) -> bool:
        return bool(self.settings.get("progress", True))

    def teacher(self, run_seeds: list[int], record: bool) -> Trajectories:
        """Teacher ODE trajectories of ``run_seeds`` on the candidate levels."""
        setup = self.setup
        noise = SeedNoise(run_seeds).randn(setup.shape, dtype=setup.dtype, device=setup.device)
        labels = setup.labels_for(run_seeds)
        return teacher_trajectories(
            setup.model,
            noise,
            self.levels,
            teacher=self.settings.teacher.sampler,
            substeps=self.settings.teacher.substeps,
            cond={"class_labels": labels.to(setup.device)} if labels is not None else None,
            guidance=setup.guidance,
            record=record,
            batch_size=self.settings.batch_size,
            seeds=run_seeds,
            progress=self.progress,
        )


def check_method(settings: DictConfig) -> tuple[str, str | None]:
    """``schedule_search.method`` and, for the gradient methods, its ``init`` (both checked)."""
    method = settings.method
    check_choice("schedule_search.method", method, METHODS)
    check_range("schedule_search.batch_size", settings.batch_size, low=1)
    init_kind = settings[method].init if method in ("ays", "quality") else None
    if init_kind is not None:
        check_choice(f"schedule_search.{method}.init", init_kind, INITS)
    return method, init_kind


def check_deterministic(sampler: Sampler) -> None:
    """Schedule search measures the error against the ODE solution: ODE samplers only."""
    if sampler.spec.stochastic:
        deterministic = sorted(name for name, spec in SAMPLERS.items() if not spec.stochastic)
        fail(
            f"sampler={sampler.name!r} is stochastic; schedule search measures the error against the ODE "
            f"solution and needs an ODE sampler: {', '.join(deterministic)}"
        )


def search_seeds(settings: DictConfig) -> tuple[list[int], list[int]]:
    """The search seeds and the held-out seeds (disjoint)."""
    seeds = parse_seeds(settings.seeds, "schedule_search.seeds")
    if not seeds:
        fail("schedule_search.seeds is empty; give e.g. schedule_search.seeds=100000-100255")
    holdout = settings.holdout_seeds
    holdout_seeds = parse_seeds(holdout, "schedule_search.holdout_seeds") if holdout is not None else []
    if set(seeds) & set(holdout_seeds):
        fail("schedule_search.holdout_seeds overlap schedule_search.seeds; held-out seeds must differ")
    return seeds, holdout_seeds


def prepare_search(cfg: DictConfig) -> Search:
    """Check the settings, build the shared setup and compute what all NFEs share."""
    settings = cfg.schedule_search
    method, init_kind = check_method(settings)
    seeds, holdout_seeds = search_seeds(settings)
    check_deterministic(instantiate(cfg.sampler))  # before the model loads
    setup = plan(cfg, seeds=seeds)
    bounds = sigma_range(setup.sampler, setup.model)
    levels = candidate_sigmas(*bounds, settings.candidates)
    search = Search(cfg, setup, method, init_kind, seeds, holdout_seeds, bounds, levels)
    tick = time.perf_counter()
    needs_costs = method == "gits" or init_kind == "gits"
    # The quality method measures FID, not the distance to the ODE: teachers only for a GITS start.
    if method != "quality" or needs_costs:
        search.search_set = search.teacher(seeds, record=needs_costs)
    if holdout_seeds and method != "quality":
        search.holdout = search.teacher(holdout_seeds, record=False)
    search.shared["teacher_wall_s"] = round(time.perf_counter() - tick, 1)
    if method == "quality":
        search.objective = quality_objective(cfg, setup, setup.sampler)
        search.validation_seeds = parse_seeds(
            settings.quality.validation_seeds, "schedule_search.quality.validation_seeds"
        )
    if needs_costs:  # the one-step costs do not depend on the step count: shared by all NFEs
        tick = time.perf_counter()
        search.cost, calls = step_costs(
            setup.sampler,
            setup.model,
            search.search_set,
            guidance=setup.guidance,
            batch_size=settings.batch_size,
            progress=search.progress,
        )
        search.shared.update(
            cost_model_calls=calls,
            cost_trajectories=len(search.search_set),
            cost_wall_s=round(time.perf_counter() - tick, 1),
        )
        log.info("GITS step costs: %d model calls in %.1f s", calls, search.shared["cost_wall_s"])
    return search


def run_method(search: Search, sampler: Sampler) -> tuple[torch.Tensor, dict[str, Any], dict[str, Any]]:
    """The found grid of ``sampler`` (its step count), the method's report and its settings."""
    settings, model, guidance = search.settings, search.setup.model, search.setup.guidance
    common = {"batch_size": settings.batch_size, "progress": search.progress}
    if search.method == "gits":
        sigmas, report = gits_search(
            sampler,
            model,
            search.search_set,
            guidance=guidance,
            cost=search.cost,
            refine_sweeps=settings.gits.refine_sweeps,
            refine_trajectories=settings.gits.refine_trajectories,
            **common,
        )
        return sigmas, report, OmegaConf.to_container(settings.gits)
    init, init_report = start_grid(
        search.init_kind, sampler, model, search.search_set, search.cost, search.bounds
    )
    if search.method == "ays":
        sigmas, report = ays_search(
            sampler,
            model,
            search.search_set.subset(settings.ays.trajectories),
            init,
            sigma_floor=search.bounds[0],
            guidance=guidance,
            iterations=settings.ays.iterations,
            lr=settings.ays.lr,
            **common,
        )
    else:
        search.objective = dataclasses.replace(search.objective, sampler=sampler)
        sigmas, report = quality_search(
            search.objective,
            init,
            sigma_floor=search.bounds[0],
            validation_seeds=search.validation_seeds,
            progress=search.progress,
            **descent_settings(settings.quality),
        )
    report.update(init_report)
    return sigmas, report, OmegaConf.to_container(settings[search.method], resolve=True)


def compare_with_baseline(
    search: Search, sampler: Sampler, sigmas: torch.Tensor, report: dict[str, Any], nfe: int
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The configured grid and the scores of both grids (validation FID, or RMS to the teacher)."""
    setup = search.setup
    baseline = sampler.sigmas(setup.model)
    if search.method == "quality":
        validation = search.settings.quality.validation_seeds
        metrics = quality_metrics(search.objective, validation, search.validation_seeds, baseline, report)
    else:
        metrics = rms_metrics(
            sampler,
            setup.model,
            setup.guidance,
            search.settings.batch_size,
            baseline,
            sigmas,
            search.search_set,
            search.holdout,
        )
    score = "fid" if search.method == "quality" else "rms"
    for name, values in metrics.items():
        log.info(
            "NFE %d, %s %s: %s schedule %.4g, optimized %.4g",
            nfe,
            name,
            "FID" if search.method == "quality" else "RMS to the teacher",
            search.base.schedule.kind,
            values[f"baseline_{score}"],
            values[score],
        )
    return baseline, metrics


def schedule_summary(search: Search, sampler: Sampler, nfe: int, found: dict[str, Any]) -> dict[str, Any]:
    """What a schedule file records next to its sigmas (provenance, settings, scores)."""
    settings = search.settings
    return {
        "sampler": sampler.name,
        "knobs": dict(sampler.knobs),
        "nfe": nfe,
        "method": search.method,
        "model": model_description(search.cfg, search.setup.model),
        "class_labels": search.cfg.get("class_labels"),
        "precision": search.cfg.get("precision", "float32"),
        "trajectories": len(search.seeds) if search.search_set is not None else 0,
        "seeds": str(settings.seeds),
        "holdout_seeds": str(settings.holdout_seeds) if search.holdout is not None else None,
        "teacher": {
            **(search.search_set.teacher if search.search_set is not None else {}),
            "candidates": len(search.levels),
            "sigma_min": search.bounds[0],
            "sigma_max": search.bounds[1],
        },
        "settings": found["settings"],
        "baseline": {"kind": search.base.schedule.kind, "sigmas": found["baseline"].tolist()},
        "metrics": found["metrics"],
        "report": {**search.shared, **found["report"], "search_wall_s": found["wall_s"]},
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def judge(metrics: dict[str, Any]) -> dict[str, Any]:
    """Whether the found grid beats the configured one where it counts: on the held-out seeds, else the
    validation seeds (method=quality), else the search trajectories."""
    where = next(name for name in ("holdout", "validation", "search") if name in metrics)
    values = metrics[where]
    score = "fid" if "fid" in values else "rms"
    found, baseline = float(values[score]), float(values[f"baseline_{score}"])
    return {"on": where, "score": score, "found": found, "baseline": baseline, "better": found <= baseline}


def write_result(
    search: Search, sampler: Sampler, nfe: int, found: dict[str, Any], sigmas: torch.Tensor, out_dir: Path
) -> dict[str, Any]:
    """Write the schedule file of one NFE and return its summary (plus ``path``, ``steps``, ``command``).

    A grid that loses to the configured schedule is not written as the result: it goes to
    ``<name>.rejected.yaml`` for inspection, a warning says so (log and summary), and the command to
    use is the configured schedule's.
    """
    summary = schedule_summary(search, sampler, nfe, found)
    verdict = judge(found["metrics"])
    name = f"schedule-{sampler.name}-nfe{nfe}-{search.method}"
    path = out_dir / (f"{name}.yaml" if verdict["better"] else f"{name}.rejected.yaml")
    warning = None
    if not verdict["better"]:
        kind = search.base.schedule.kind
        warning = (
            f"the {search.method} schedule for {sampler.name} at NFE {nfe} is worse than the configured "
            f"{kind} schedule on the {WHERE[verdict['on']]} ({verdict['score'].upper()} "
            f"{verdict['found']:.4g} vs {verdict['baseline']:.4g}): it is not the result (kept for "
            f"inspection as {path.name}); keep the {kind} schedule"
        )
        log.warning(warning)
    summary["verdict"] = {**verdict, "recommended": "searched" if verdict["better"] else "configured"}
    save_schedule_file(path, sigmas, **summary)
    log.info("schedule written to %s", path)
    command = follow_up_command(search.cfg, sampler, path if verdict["better"] else None)
    return {
        **summary,
        "sigmas": sigmas.tolist(),
        "steps": sampler.steps,
        "path": str(path),
        "command": command,
        "warning": warning,
    }


WHERE = {"holdout": "held-out seeds", "validation": "validation seeds", "search": "search trajectories"}
#: settings of a search's command line that do not carry over to sampling with its result
SEARCH_ONLY = (
    "mode",
    "schedule_search",
    "hydra",
    "seeds",
    "batch_size",
    "output_dir",
    "paths",
    "logger",
    "progress",
    "hparams_search",
    "trainer",
    "task_name",
    "grid_size",
    "sampler.steps",
)


def follow_up_command(cfg: DictConfig, sampler: Sampler, path: Path | None) -> str:
    """``python sample.py ...`` that samples with the search's model settings (the command line's
    ``model=``, ``model.fn=``, guidance, precision, sampler knobs, ...) and the written schedule file,
    or, with ``path=None``, with the configured schedule (the user's ``sampler.schedule.*`` kept)."""
    drop = (*SEARCH_ONLY, "sampler.schedule") if path is not None else SEARCH_ONLY
    overrides = [
        item
        for item in command_overrides()
        if not any(setting_of(item) == key or setting_of(item).startswith(f"{key}.") for key in drop)
    ]
    if any(setting_of(item) == "experiment" for item in overrides):
        overrides.append("mode=generate")  # an experiment may set mode=optimize_schedule
    if not any(setting_of(item) == "sampler" for item in overrides):
        overrides.append(f"sampler={sampler_choice(sampler)}")
    overrides.append(f"sampler.steps={sampler.steps}")
    if path is not None:
        schedule = cfg.sampler.get("schedule")
        prefix = "" if isinstance(schedule, DictConfig) and "path" in schedule else "++"
        overrides += ["sampler.schedule.kind=file", f"{prefix}sampler.schedule.path={path}"]
    return " ".join(["python", "sample.py", *(shlex.quote(item) for item in overrides)])


def command_overrides() -> list[str]:
    """The overrides of the command line that runs (Hydra's record); none outside a Hydra run."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def setting_of(override: str) -> str:
    """``model.fn`` of ``+model.fn=x`` (the key, without ``+`` / ``++`` / ``~`` and package)."""
    return override.split("=", 1)[0].lstrip("+~").split("@", 1)[0]


def sampler_choice(sampler: Sampler) -> str:
    """The ``sampler=`` option that was composed (Hydra's record), else the sampler's name."""
    if HydraConfig.initialized():
        choice = HydraConfig.get().runtime.choices.get("sampler")
        if choice:
            return str(choice)
    return sampler.name


def optimize_schedule(cfg: DictConfig) -> list[dict[str, Any]]:
    """Search schedules for ``cfg.sampler`` on ``cfg.model``, one per requested NFE.

    The teacher trajectories (and for GITS the one-step cost matrix) are computed once and shared
    by all NFEs. Returns the summaries written to the schedule files (plus ``path`` and ``steps``).
    """
    started = time.perf_counter()
    search = prepare_search(cfg)
    settings, base = search.settings, search.base
    nfes = requested_nfes(settings.nfe, base)
    step_counts = [steps_for_nfe(base, nfe) for nfe in nfes]
    log.info(
        "%s search for %s at NFE %s (steps %s) in sigma [%g, %g]",
        search.method.upper(),
        base.name,
        nfes,
        step_counts,
        *search.bounds,
    )
    out_dir = Path(settings.output) if settings.get("output") else Path(cfg.output_dir)
    summaries = []
    for nfe, steps in zip(nfes, step_counts):
        tick = time.perf_counter()
        sampler = with_steps(base, steps)
        sigmas, report, method_settings = run_method(search, sampler)
        baseline, metrics = compare_with_baseline(search, sampler, sigmas, report, nfe)
        found = {
            "settings": method_settings,
            "baseline": baseline,
            "metrics": metrics,
            "report": report,
            "wall_s": round(time.perf_counter() - tick, 1),
        }
        summaries.append(write_result(search, sampler, nfe, found, sigmas, out_dir))
    log.info("schedule search done in %.0f s", time.perf_counter() - started)
    return summaries
