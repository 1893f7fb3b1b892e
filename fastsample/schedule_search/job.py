"""The schedule-search job behind ``python sample.py mode=optimize_schedule`` (see docs/schedules.md).

Builds model and sampler from the same config as sampling, finds the step count that gives the
requested NFE, records teacher trajectories from the search seeds, runs GITS or AYS, compares the
result with the sampler's configured schedule on the search trajectories and on held-out seeds,
and writes the schedule file (sigmas + provenance) atomically into the run directory.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from fastsample.diffusion.schedules import ScheduleSpec, make_sigmas, save_schedule_file
from fastsample.samplers import Sampler
from fastsample.sampling import build_guidance, build_model, data_shape, labels_for, resolve_device
from fastsample.schedule_search.ays import ays_search
from fastsample.schedule_search.gits import gits_search, step_costs
from fastsample.schedule_search.quality import QualityObjective, quality_search
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
from fastsample.utils.seeding import SeedNoise, parse_seeds

log = logging.getLogger(__name__)

METHODS = ("gits", "ays", "quality")
INITS = ("karras", "loglinear", "vp", "gits")


def model_description(cfg: DictConfig, model: Any) -> dict[str, Any]:
    """What the schedule was searched for: the model config's target and the model's identity."""
    node = cfg.model
    described = {"config": OmegaConf.select(node, "_target_", default=None)}
    for key in ("name", "path"):
        value = OmegaConf.select(node, key, default=None, throw_on_missing=False)
        if value is not None:
            described[key] = value
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


def quality_objective(
    cfg: DictConfig,
    sampler: Sampler,
    model: Any,
    shape: tuple[int, ...],
    guidance: Any,
    dtype: torch.dtype,
    device: torch.device,
) -> QualityObjective:
    """KID / FID of ``sampler`` in ``schedule_search.quality.features`` against ``cfg.dataset``.

    The real features and statistics come from the reference cache of evaluate.py (built once).
    """
    from fastsample.evaluation import Evaluator, prepare_reference

    settings = cfg.schedule_search.quality
    check_range("schedule_search.quality.real_features", settings.real_features, low=2)
    extractor = instantiate(settings.features).to(device)
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
    num_classes = getattr(model, "num_classes", None)
    return QualityObjective(
        sampler=sampler,
        model=model,
        features=extractor,
        real_features=real,
        reference_mu=reference.mu,
        reference_sigma=reference.sigma,
        shape=tuple(shape),
        labels=lambda seeds: labels_for(seeds, cfg.get("class_labels"), num_classes),
        guidance=guidance,
        batch_size=cfg.schedule_search.batch_size,
        dtype=dtype,
        device=device,
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


def optimize_schedule(cfg: DictConfig) -> list[dict[str, Any]]:
    """Search schedules for ``cfg.sampler`` on ``cfg.model``, one per requested NFE.

    The teacher trajectories (and for GITS the one-step cost matrix) are computed once and shared
    by all NFEs. Returns the summaries written to the schedule files (plus ``path`` and ``steps``).
    """
    settings = cfg.schedule_search
    method = settings.method
    check_choice("schedule_search.method", method, METHODS)
    check_choice("precision", cfg.get("precision", "float32"), ("float32", "float64"))
    check_range("schedule_search.batch_size", settings.batch_size, low=1)
    init_kind = settings[method].init if method in ("ays", "quality") else None
    if init_kind is not None:
        check_choice(f"schedule_search.{method}.init", init_kind, INITS)
    base: Sampler = instantiate(cfg.sampler)
    if base.spec.stochastic:
        from fastsample.samplers import SAMPLERS

        deterministic = sorted(name for name, spec in SAMPLERS.items() if not spec.stochastic)
        fail(
            f"sampler={base.name!r} is stochastic; schedule search measures the error against the ODE "
            f"solution and needs an ODE sampler: {', '.join(deterministic)}"
        )
    nfes = requested_nfes(settings.nfe, base)
    step_counts = [steps_for_nfe(base, nfe) for nfe in nfes]
    seeds = parse_seeds(settings.seeds)
    if not seeds:
        fail("schedule_search.seeds is empty; give e.g. schedule_search.seeds=100000-100255")
    holdout_seeds = parse_seeds(settings.holdout_seeds) if settings.holdout_seeds is not None else []
    if set(seeds) & set(holdout_seeds):
        fail("schedule_search.holdout_seeds overlap schedule_search.seeds; held-out seeds must differ")

    started = time.perf_counter()
    device = resolve_device(cfg.device)
    dtype = torch.float64 if cfg.get("precision") == "float64" else torch.float32
    model = build_model(cfg, device)
    if dtype == torch.float64:
        model = model.double()
    shape = data_shape(cfg, model)
    guidance = build_guidance(cfg)
    sigma_min, sigma_max = sigma_range(base, model)
    levels = candidate_sigmas(sigma_min, sigma_max, settings.candidates)
    progress = bool(settings.get("progress", True))
    log.info(
        "%s search for %s at NFE %s (steps %s) in sigma [%g, %g]: %s",
        method.upper(),
        base.name,
        nfes,
        step_counts,
        sigma_min,
        sigma_max,
        f"{len(seeds)} teacher trajectories, {len(levels)} candidates"
        if method != "quality"
        else f"KID in {settings.quality.features.get('_target_')}, "
        f"validation seeds {settings.quality.validation_seeds}",
    )

    def teacher(run_seeds: list[int], record: bool) -> Trajectories:
        noise = SeedNoise(run_seeds).randn(shape, dtype=dtype, device=device)
        labels = labels_for(run_seeds, cfg.get("class_labels"), getattr(model, "num_classes", None))
        return teacher_trajectories(
            model,
            noise,
            levels,
            teacher=settings.teacher.sampler,
            substeps=settings.teacher.substeps,
            cond={"class_labels": labels.to(device)} if labels is not None else None,
            guidance=guidance,
            record=record,
            batch_size=settings.batch_size,
            seeds=run_seeds,
            progress=progress,
        )

    tick = time.perf_counter()
    needs_costs = method == "gits" or init_kind == "gits"
    # The quality method measures FID, not the distance to the ODE: teachers only for a GITS start.
    search_set = teacher(seeds, record=needs_costs) if method != "quality" or needs_costs else None
    holdout = teacher(holdout_seeds, record=False) if holdout_seeds and method != "quality" else None
    shared: dict[str, Any] = {"teacher_wall_s": round(time.perf_counter() - tick, 1)}
    objective = (
        quality_objective(cfg, base, model, shape, guidance, dtype, device) if method == "quality" else None
    )
    validation_seeds = parse_seeds(settings.quality.validation_seeds) if method == "quality" else []
    cost = None
    if needs_costs:  # the one-step costs do not depend on the step count: shared by all NFEs
        tick = time.perf_counter()
        cost, calls = step_costs(
            base, model, search_set, guidance=guidance, batch_size=settings.batch_size, progress=progress
        )
        shared.update(
            cost_model_calls=calls,
            cost_trajectories=len(search_set),
            cost_wall_s=round(time.perf_counter() - tick, 1),
        )
        log.info("GITS step costs: %d model calls in %.1f s", calls, shared["cost_wall_s"])

    out_dir = Path(settings.output) if settings.get("output") else Path(cfg.output_dir)
    summaries = []
    for nfe, steps in zip(nfes, step_counts):
        tick = time.perf_counter()
        sampler = with_steps(base, steps)
        if method == "gits":
            sigmas, report = gits_search(
                sampler,
                model,
                search_set,
                guidance=guidance,
                cost=cost,
                refine_sweeps=settings.gits.refine_sweeps,
                refine_trajectories=settings.gits.refine_trajectories,
                batch_size=settings.batch_size,
                progress=progress,
            )
            method_settings = OmegaConf.to_container(settings.gits)
        else:
            init, init_report = start_grid(
                init_kind, sampler, model, search_set, cost, (sigma_min, sigma_max)
            )
            if method == "ays":
                sigmas, report = ays_search(
                    sampler,
                    model,
                    search_set.subset(settings.ays.trajectories),
                    init,
                    sigma_floor=sigma_min,
                    guidance=guidance,
                    iterations=settings.ays.iterations,
                    lr=settings.ays.lr,
                    batch_size=settings.batch_size,
                    progress=progress,
                )
            else:
                objective = dataclasses.replace(objective, sampler=sampler)
                sigmas, report = quality_search(
                    objective,
                    init,
                    sigma_floor=sigma_min,
                    validation_seeds=validation_seeds,
                    seed_offset=settings.quality.seed_offset,
                    samples=settings.quality.samples,
                    iterations=settings.quality.iterations,
                    lr=settings.quality.lr,
                    validate_every=settings.quality.validate_every,
                    progress=progress,
                )
            report.update(init_report)
            method_settings = OmegaConf.to_container(settings[method], resolve=True)

        baseline = sampler.sigmas(model)
        if method == "quality":
            metrics = quality_metrics(
                objective, settings.quality.validation_seeds, validation_seeds, baseline, report
            )
        else:
            metrics = rms_metrics(
                sampler, model, guidance, settings.batch_size, baseline, sigmas, search_set, holdout
            )
        score = "fid" if method == "quality" else "rms"
        for name, values in metrics.items():
            log.info(
                "NFE %d, %s %s: %s schedule %.4g, optimized %.4g",
                nfe,
                name,
                "FID" if method == "quality" else "RMS to the teacher",
                base.schedule.kind,
                values[f"baseline_{score}"],
                values[score],
            )
        summary = {
            "sampler": sampler.name,
            "knobs": dict(sampler.knobs),
            "nfe": nfe,
            "method": method,
            "model": model_description(cfg, model),
            "class_labels": cfg.get("class_labels"),
            "precision": cfg.get("precision", "float32"),
            "trajectories": len(seeds) if search_set is not None else 0,
            "seeds": str(settings.seeds),
            "holdout_seeds": str(settings.holdout_seeds) if holdout is not None else None,
            "teacher": {
                **(search_set.teacher if search_set is not None else {}),
                "candidates": len(levels),
                "sigma_min": sigma_min,
                "sigma_max": sigma_max,
            },
            "settings": method_settings,
            "baseline": {"kind": base.schedule.kind, "sigmas": baseline.tolist()},
            "metrics": metrics,
            "report": {**shared, **report, "search_wall_s": round(time.perf_counter() - tick, 1)},
            "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        path = out_dir / f"schedule-{sampler.name}-nfe{nfe}-{method}.yaml"
        save_schedule_file(path, sigmas, **summary)
        log.info("schedule written to %s", path)
        summaries.append({**summary, "sigmas": sigmas.tolist(), "steps": steps, "path": str(path)})
    log.info("schedule search done in %.0f s", time.perf_counter() - started)
    return summaries
