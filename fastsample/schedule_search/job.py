"""The schedule-search job behind ``python sample.py mode=optimize_schedule`` (see docs/schedules.md).

Builds model and sampler from the same config as sampling, finds the step count that gives the
requested NFE, records teacher trajectories from the search seeds, runs GITS or AYS, compares the
result with the sampler's configured schedule on the search trajectories and on held-out seeds,
and writes the schedule file (sigmas + provenance) atomically into the run directory.
"""

from __future__ import annotations

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

METHODS = ("gits", "ays")
AYS_INITS = ("karras", "loglinear", "vp", "gits")


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
    if method == "ays":
        check_choice("schedule_search.ays.init", settings.ays.init, AYS_INITS)
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
        "%s search for %s at NFE %s (steps %s): %d trajectories, %d candidates in [%g, %g]",
        method.upper(),
        base.name,
        nfes,
        step_counts,
        len(seeds),
        len(levels),
        sigma_min,
        sigma_max,
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
    needs_costs = method == "gits" or settings.ays.init == "gits"
    search_set = teacher(seeds, record=needs_costs)
    holdout = teacher(holdout_seeds, record=False) if holdout_seeds else None
    shared: dict[str, Any] = {"teacher_wall_s": round(time.perf_counter() - tick, 1)}
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
            if settings.ays.init == "gits":  # the GITS DP path (no refinement), polished by gradient
                init, init_report = gits_search(
                    sampler, model, search_set, cost=cost, refine_sweeps=0, progress=progress
                )
            else:
                init_spec = ScheduleSpec(
                    kind=settings.ays.init, rho=base.schedule.rho, sigma_min=sigma_min, sigma_max=sigma_max
                )
                init, init_report = make_sigmas(init_spec, steps, model), {}
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
            report.update(init_report)
            method_settings = OmegaConf.to_container(settings.ays)

        baseline = sampler.sigmas(model)
        rms = lambda grid, trajectories, sampler=sampler: final_rms(  # noqa: E731
            sampler, model, grid, trajectories, guidance=guidance, batch_size=settings.batch_size
        )
        metrics: dict[str, Any] = {
            "search": {
                "trajectories": len(seeds),
                "baseline_rms": rms(baseline, search_set),
                "rms": rms(sigmas, search_set),
            }
        }
        if holdout is not None:
            metrics["holdout"] = {
                "trajectories": len(holdout_seeds),
                "baseline_rms": rms(baseline, holdout),
                "rms": rms(sigmas, holdout),
            }
        for name, values in metrics.items():
            log.info(
                "NFE %d, %s RMS to the teacher: %s schedule %.4g, optimized %.4g",
                nfe,
                name,
                base.schedule.kind,
                values["baseline_rms"],
                values["rms"],
            )
        summary = {
            "sampler": sampler.name,
            "knobs": dict(sampler.knobs),
            "nfe": nfe,
            "method": method,
            "model": model_description(cfg, model),
            "class_labels": cfg.get("class_labels"),
            "precision": cfg.get("precision", "float32"),
            "trajectories": len(seeds),
            "seeds": str(settings.seeds),
            "holdout_seeds": str(settings.holdout_seeds) if holdout_seeds else None,
            "teacher": {
                **search_set.teacher,
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
