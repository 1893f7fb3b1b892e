"""The tuning job behind ``python sample.py mode=tune`` (settings: conf/tune/default.yaml, docs/tuning.md).

For one model and each NFE budget in ``tune.nfe`` it scores solver x few-step knobs x schedule family
(``tune.solvers`` / ``tune.variants`` / ``tune.schedules``) plus schedules searched for the leading
solvers (GITS / AYS / quality, ``tune.search``), selects by FID in one feature space
(``tune.select_features``) on selection seeds with successive halving (``tune.rounds``), then judges
the finalists in other feature spaces (``tune.report_features``) on seeds the tuner never used
(``tune.report_seeds``), and writes ``tuned-nfe<N>.yaml`` (:mod:`fastsample.samplers.tuned`) into the
run directory. Finished work is cached in ``<run dir>/tune-cache``: a rerun with the same settings
reuses every scored candidate and searched schedule.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from tqdm import tqdm

from fastsample.jobs.schedule_search import model_description
from fastsample.jobs.setup import Setup, plan
from fastsample.jobs.tuning_candidates import (
    SEARCH_METHODS,
    Candidate,
    SearchContext,
    best_families,
    cross_candidates,
    leading_configs,
    screen_candidates,
    searched_candidate,
    unique,
)
from fastsample.jobs.tuning_scores import (
    CallCounter,
    ScoreCache,
    Space,
    Usage,
    build_report_spaces,
    build_space,
    digest,
    generate_stats,
    halving_survivors,
    space_scores,
)
from fastsample.metrics import FeatureStats
from fastsample.samplers.tuned import save_tuned_file
from fastsample.schedule_search.quality import QualityObjective, iteration_seeds
from fastsample.schedule_search.trajectories import candidate_sigmas, teacher_trajectories
from fastsample.utils.errors import check_choice, check_range, fail
from fastsample.utils.seeding import SeedNoise, parse_seeds

log = logging.getLogger(__name__)


@dataclass
class Tuning:
    """What every NFE of one tuning run shares: setup, seed sets, feature spaces, cache, searches."""

    cfg: DictConfig
    setup: Setup
    seeds: dict[str, list[int]]  # search, select, report (disjoint), quality / ggdm (the KID searches')
    select: Space
    report: dict[str, Space]
    skipped_spaces: dict[str, str]
    cache: ScoreCache
    counter: CallCounter
    search: SearchContext
    out_dir: Path
    usage: Usage = field(default_factory=Usage)
    prepared: dict[str, float] = field(default_factory=dict)  # setup time shared by every budget
    stats: dict[str, FeatureStats] = field(default_factory=dict)  # selection stats in memory, per candidate

    @property
    def settings(self) -> DictConfig:
        return self.cfg.tune

    @property
    def progress(self) -> bool:
        return bool(self.settings.get("progress", True))


# -- settings --------------------------------------------------------------------------------------
def requested_nfes(value: Any) -> list[int]:
    """``tune.nfe``: one budget or a list."""
    values = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
    if not values or any(v is None for v in values):
        fail("tune.nfe must be an NFE budget or a list of them, e.g. tune.nfe=[5,10]")
    for v in values:
        check_range("tune.nfe", v, low=1)
    return [int(v) for v in values]


def tuning_seeds(settings: DictConfig) -> dict[str, list[int]]:
    """The seed sets; the report's must be disjoint from every seed the tuner uses (one-line error)."""
    seeds = {name: parse_seeds(settings[f"{name}_seeds"]) for name in ("search", "select", "report")}
    rounds = [int(n) for n in settings.rounds]
    if not rounds or rounds != sorted(rounds) or rounds[0] < 2:
        fail(f"tune.rounds={rounds} must be increasing seed counts of at least 2, e.g. [256, 512, 1024]")
    if rounds[-1] > len(seeds["select"]):
        fail(f"tune.rounds ends at {rounds[-1]} seeds but tune.select_seeds has only {len(seeds['select'])}")
    if len(seeds["report"]) < 2:
        fail("tune.report_seeds needs at least 2 seeds, e.g. tune.report_seeds=0-999")
    seeds.update(learning_seeds(settings.search))
    used = {name: seeds[name] for name in ("search", "select")}
    used |= {"search.quality": seeds["quality"], "search.ggdm": seeds["ggdm"]}
    for name, values in used.items():
        overlap = sorted(set(values) & set(seeds["report"]))
        if overlap:
            fail(
                f"tune.report_seeds overlap tune.{name} seeds (e.g. {overlap[0]}); the report must use "
                "seeds the tuner never saw"
            )
    if set(seeds["select"]) & set(seeds["search"] + seeds["quality"] + seeds["ggdm"]):
        fail("tune.select_seeds overlap the search seeds (tune.search_seeds, the quality search's or GGDM's)")
    return seeds


def learning_seeds(search: DictConfig) -> dict[str, list[int]]:
    """The seeds of the KID-driven searches: the quality search's (its validation seeds and iterations)
    and GGDM's (the same validation seeds, its own iterations); empty for a method that does not run."""
    methods = set(search.methods)
    validation = parse_seeds(search.quality.validation_seeds) if {"quality", "ggdm"} & methods else []
    found = {"quality": [], "ggdm": []}
    for method in ("quality", "ggdm"):
        if method in methods:
            node = search[method]
            found[method] = validation + iteration_seeds(node.seed_offset, 0, node.iterations * node.samples)
    return found


def check_settings(settings: DictConfig) -> None:
    """The search methods and the halving settings (before anything is built)."""
    for method in settings.search.methods:
        check_choice("tune.search.methods", method, SEARCH_METHODS)
    check_range("tune.keep", settings.keep, low=0, high=1, low_inclusive=False)
    check_range("tune.min_keep", settings.min_keep, low=1)
    check_range("tune.report_top", settings.report_top, low=1)


# -- preparation -----------------------------------------------------------------------------------
def make_teacher(tuning: Tuning) -> Any:
    """A function computing the teacher trajectories of the search seeds (once, on first use)."""

    def compute() -> Any:
        setup, search = tuning.setup, tuning.settings.search
        seeds = tuning.seeds["search"]
        model = setup.model
        levels = candidate_sigmas(float(model.sigma_min), float(model.sigma_max), search.candidates)
        noise = SeedNoise(seeds).randn(setup.shape, dtype=setup.dtype, device=setup.device)
        labels = setup.labels_for(seeds)
        return teacher_trajectories(
            model,
            noise,
            levels,
            teacher=search.teacher.sampler,
            substeps=search.teacher.substeps,
            cond={"class_labels": labels.to(setup.device)} if labels is not None else None,
            guidance=setup.guidance,
            batch_size=search.batch_size,
            seeds=seeds,
            progress=tuning.progress,
        )

    return compute


def quality_objective(tuning: Tuning) -> QualityObjective:
    """The quality search's KID loss in the selection features (never the report's)."""
    setup, quality = tuning.setup, tuning.settings.search.quality
    reference = tuning.select.evaluator.reference
    if reference.features is None or len(reference.features) < 2:
        fail("the quality search needs raw reference features; delete the cached reference file")
    return QualityObjective(
        sampler=None,  # set per solver (dataclasses.replace)
        model=setup.model,
        features=tuning.select.evaluator.extractor,
        real_features=torch.as_tensor(reference.features[: quality.real_features], dtype=torch.float64),
        reference_mu=reference.mu,
        reference_sigma=reference.sigma,
        shape=setup.shape,
        labels=setup.labels_for,
        guidance=setup.guidance,
        batch_size=tuning.settings.search.batch_size,
        dtype=setup.dtype,
        device=setup.device,
    )


def cache_context(cfg: DictConfig, setup: Setup, select: Space, seeds: dict[str, list[int]]) -> dict:
    """What every cached score depends on besides the candidate: model, labels, precision, the
    selection space and its reference, the selection seeds."""
    return {
        "model": model_description(cfg, setup.model),
        "class_labels": cfg.get("class_labels"),
        "precision": cfg.get("precision", "float32"),
        "guidance": setup.describe().get("guidance"),
        "select": select.describe(),
        "select_seeds": digest(seeds["select"]),
    }


def prepare_tuning(cfg: DictConfig) -> Tuning:
    """Check the settings (before the model loads), then build the setup, spaces, cache and searches."""
    settings = cfg.tune
    check_settings(settings)
    seeds = tuning_seeds(settings)
    setup = plan(cfg, seeds=seeds["select"])
    methods = list(settings.search.methods)
    learning = {"quality", "ggdm"} & set(methods)  # the KID searches (real features for the loss)
    keep = settings.search.quality.real_features if learning else 0
    select = build_space(cfg, "select", settings.select_features, settings.select_split, setup.device, keep)
    report, skipped = build_report_spaces(cfg, setup.device)
    out_dir = Path(settings.output) if settings.get("output") else Path(cfg.output_dir)
    cache = ScoreCache(out_dir / "tune-cache", cache_context(cfg, setup, select, seeds))
    floor = float(getattr(setup.model, "sigma_min", 0.002))
    search = SearchContext(settings.search, setup.model, setup.guidance, floor)
    tuning = Tuning(
        cfg, setup, seeds, select, report, skipped, cache, CallCounter(setup.model), search, out_dir
    )
    if {"gits", "ays"} & set(methods):
        search.make_teacher = make_teacher(tuning)
    if learning:
        search.objective = quality_objective(tuning)
        search.validation_seeds = parse_seeds(settings.search.quality.validation_seeds)
    return tuning


# -- scoring ---------------------------------------------------------------------------------------
def selection_stats(
    tuning: Tuning, candidate: Candidate, count: int, bar: Any
) -> tuple[FeatureStats, list[int]]:
    """Selection-space statistics of the first ``count`` selection seeds: what is in memory or in the
    cache is extended with the missing seeds only (nested seed sets, one generation per seed)."""
    key = digest(candidate.setting)
    stats = tuning.stats.get(key) or tuning.cache.load_stats(candidate.setting)
    if stats is None or stats.count > count:
        stats = FeatureStats(0, 0)
    seeds = tuning.seeds["select"][stats.count : count]
    fresh, calls = generate_stats(
        tuning.setup, candidate.sampler, seeds, {"select": tuning.select}, tuning.usage, tuning.counter, bar
    )
    stats.merge(fresh["select"])
    tuning.stats[key] = stats
    tuning.cache.save_stats(candidate.setting, stats)
    return stats, calls


def fingerprint(tuning: Tuning, candidate: Candidate) -> str:
    """A hash of the candidate's samples for the first two selection seeds (cached)."""
    cached = tuning.cache.load("fingerprint", candidate.setting)
    if cached is not None:
        return cached["hash"]
    runner = dataclasses.replace(tuning.setup, sampler=candidate.sampler)
    tick, calls, rows = time.perf_counter(), tuning.counter.calls, tuning.counter.rows
    with torch.no_grad():
        images = runner.generate(tuning.seeds["select"][:2])
    tuning.usage.generate_s += time.perf_counter() - tick
    tuning.usage.model_calls += tuning.counter.calls - calls
    tuning.usage.sample_evaluations += tuning.counter.rows - rows
    found = hashlib.sha1(images.cpu().numpy().tobytes()).hexdigest()
    tuning.cache.save("fingerprint", candidate.setting, {"hash": found})
    return found


def drop_repeats(tuning: Tuning, candidates: list[Candidate], seen: dict[str, str]) -> list[Candidate]:
    """The candidates whose samples differ from every earlier one's. A knob can be inert on a grid
    (``euler_at_final`` when the last step returns the denoised estimate anyway): such a candidate
    draws the very same samples as another and is skipped, naming it, before any seed set is spent."""
    kept = []
    for candidate in candidates:
        found = fingerprint(tuning, candidate)
        if found in seen:
            candidate.skipped = f"same samples as {seen[found]}"
        else:
            seen[found] = candidate.key
            kept.append(candidate)
    return kept


def score_round(tuning: Tuning, candidates: list[Candidate], count: int, title: str) -> None:
    """Selection FID of ``candidates`` on the first ``count`` selection seeds (cached ones are reused)."""
    pending = []
    for candidate in candidates:
        cached = tuning.cache.load("round", {"candidate": candidate.setting, "seeds": count})
        if cached is not None:
            candidate.scores[count] = cached
        else:
            pending.append(candidate)
    total = sum(count - getattr(tuning.stats.get(digest(c.setting)), "count", 0) for c in pending)
    bar = tqdm(total=total, desc=title, unit="sample", disable=not tuning.progress or not pending)
    for candidate in pending:
        bar.set_postfix_str(candidate.key)
        stats, calls = selection_stats(tuning, candidate, count, bar)
        scores = {**space_scores(tuning.select, stats, None), "nfe": candidate.sampler.nfe}
        if calls:
            scores["nfe_counted"] = max(calls)
        candidate.scores[count] = scores
        tuning.cache.save("round", {"candidate": candidate.setting, "seeds": count}, scores)
    bar.close()


def report_scores(tuning: Tuning, candidate: Candidate) -> dict[str, Any]:
    """Held-out scores: one generation of the report seeds, features in every report space (and the
    selection space, for comparison) in the same pass."""
    seeds = tuning.seeds["report"]
    spaces = {**tuning.report, "select": tuning.select}
    payload = {
        "candidate": candidate.setting,
        "seeds": digest(seeds),
        "spaces": {k: s.describe() for k, s in spaces.items()},
    }
    cached = tuning.cache.load("report", payload)
    if cached is not None:  # JSON sorts the keys: restore the configured order (the first is the headline)
        return {**cached, "fid": {label: cached["fid"][label] for label in spaces}}
    bar = tqdm(total=len(seeds), desc=f"report {candidate.key}", unit="sample", disable=not tuning.progress)
    stats, calls = generate_stats(
        tuning.setup, candidate.sampler, seeds, spaces, tuning.usage, tuning.counter, bar
    )
    bar.close()
    labels = tuning.setup.labels_for(seeds)
    result = {
        "fid": {label: space_scores(space, stats[label], labels) for label, space in spaces.items()},
        "nfe_counted": max(calls),
    }
    tuning.cache.save("report", payload, result)
    return result


# -- one budget ------------------------------------------------------------------------------------
def add_searched(tuning: Tuning, candidates: list[Candidate], nfe: int) -> list[Candidate]:
    """Schedules searched for the leading (solver, variant) pairs of the first round."""
    search = tuning.settings.search
    found = []
    for leader in leading_configs(candidates, search.top):
        for method in search.methods:
            log.info("NFE %d: %s schedule for %s/%s", nfe, method, leader.solver, leader.variant)
            found.append(searched_candidate(tuning.search, method, leader, tuning.cache))
    return found


def first_round(tuning: Tuning, nfe: int) -> list[Candidate]:
    """Every candidate of the budget scored on the first round's seeds: the screening stage (every
    family with the screening solvers), every solver x variant on the best families, searched
    schedules for the leading solvers. Returns all candidates, skipped ones included."""
    settings, model = tuning.settings, tuning.setup.model
    count = int(settings.rounds[0])
    seen: dict[str, str] = {}  # sample fingerprint -> the first candidate that drew those samples

    def score(stage: str, group: list[Candidate]) -> None:
        runnable = drop_repeats(tuning, [c for c in group if c.skipped is None], seen)
        score_round(tuning, runnable, count, f"NFE {nfe} {stage}: {len(runnable)} candidates x {count} seeds")

    candidates = screen_candidates(settings, nfe, model)
    score("screen", candidates)
    if settings.screen.solvers is not None:
        families = best_families(candidates, settings.screen.top)
        # stage-1 candidates come first in the union, so what follows them is new (repeats removed)
        union = unique(candidates + cross_candidates(settings, nfe, model, families=families))
        more = union[len(candidates) :]
        score("solvers", more)
        candidates += more
    if settings.search.methods:
        searched = add_searched(tuning, candidates, nfe)
        score("searched", searched)
        candidates += searched
    return candidates


def run_rounds(tuning: Tuning, candidates: list[Candidate], nfe: int) -> list[Candidate]:
    """Successive halving over ``tune.rounds``; returns the candidates scored on the last round."""
    settings = tuning.settings
    rounds = [int(n) for n in settings.rounds]
    alive = [c for c in candidates if c.skipped is None]
    for number, (done, count) in enumerate(zip(rounds, rounds[1:]), start=2):
        fids = {c.key: c.scores[done]["fid"] for c in alive}
        kept = set(halving_survivors(fids, settings.keep, settings.min_keep, settings.drop_ratio))
        for candidate in alive:
            if candidate.key not in kept:
                candidate.dropped_at = done
        alive = [c for c in alive if c.key in kept]
        title = f"NFE {nfe} round {number}: {len(alive)} candidates x {count} seeds"
        score_round(tuning, alive, count, title)
    return alive


def tune_nfe(tuning: Tuning, nfe: int) -> dict[str, Any]:
    """Tune one budget: candidates, rounds, selection, held-out report, the tuned-sampler file."""
    wall, cpu = time.perf_counter(), time.process_time()
    before = tuning.usage.as_dict()
    candidates = first_round(tuning, nfe)
    finalists = run_rounds(tuning, candidates, nfe)
    if not finalists:
        reason = candidates[0].skipped if candidates else "tune.schedules is empty"
        fail(f"NFE {nfe}: no candidate could run (e.g. {reason})")
    last = int(tuning.settings.rounds[-1])
    finalists.sort(key=lambda c: c.scores[last]["fid"])
    for candidate in finalists[: tuning.settings.report_top]:
        candidate.report = report_scores(tuning, candidate)
    best = finalists[0]
    timing = {
        "wall_s": round(time.perf_counter() - wall, 1),
        "cpu_s": round(time.process_time() - cpu, 1),
        "threads": torch.get_num_threads(),
        "setup": tuning.prepared,
        **{key: round(value - before[key], 1) for key, value in tuning.usage.as_dict().items()},
    }
    path = tuning.out_dir / f"tuned-nfe{nfe}.yaml"
    save_tuned_file(path, tuned_content(tuning, nfe, best, candidates, timing))
    log.info("NFE %d: selected %s (selection FID %.4g) -> %s", nfe, best.key, best.last_fid(), path)
    return {"nfe": nfe, "path": str(path), "best": best, "candidates": candidates, "timing": timing}


def tune(cfg: DictConfig) -> list[dict[str, Any]]:
    """Run the tuner for every budget of ``tune.nfe``; returns one summary per budget."""
    settings = cfg.tune
    nfes = requested_nfes(settings.nfe)
    wall, cpu = time.perf_counter(), time.process_time()
    tuning = prepare_tuning(cfg)
    # model load and reference statistics (built once per feature space, then read from the cache)
    tuning.prepared = {
        "wall_s": round(time.perf_counter() - wall, 1),
        "cpu_s": round(time.process_time() - cpu, 1),
    }
    return [tune_nfe(tuning, nfe) for nfe in nfes]


# -- the file --------------------------------------------------------------------------------------
def candidate_row(candidate: Candidate) -> dict[str, Any]:
    """One candidate as the file records it."""
    row: dict[str, Any] = {
        "key": candidate.key,
        "solver": candidate.name,
        "knobs": candidate.knobs,
        "schedule": candidate.schedule,
    }
    if candidate.skipped is not None:
        return {**row, "status": "skipped", "reason": candidate.skipped}
    row["knobs"] = candidate.sampler.solver_knobs  # all of them, defaults included
    row["steps"] = candidate.sampler.steps
    row["nfe"] = candidate.sampler.nfe
    row["sigmas"] = candidate.sampler.grid.tolist()
    row["status"] = f"dropped after {candidate.dropped_at} seeds" if candidate.dropped_at else "finalist"
    row["selection"] = {str(count): scores for count, scores in sorted(candidate.scores.items())}
    if candidate.report is not None:
        row["report"] = candidate.report
    return row


def tuned_content(
    tuning: Tuning, nfe: int, best: Candidate, candidates: list[Candidate], timing: dict[str, Any]
) -> dict[str, Any]:
    """The tuned-sampler file: how to run it, what it was selected with and judged by, every candidate."""
    settings, cfg = tuning.settings, tuning.cfg
    last = int(settings.rounds[-1])
    return {
        "nfe": nfe,
        "steps": best.sampler.steps,
        "solver": best.name,
        "knobs": best.sampler.solver_knobs,
        "candidate": best.key,
        "schedule": best.schedule,
        "sigmas": best.sampler.grid.tolist(),
        **({"learned": best.sampler.learned} if best.sampler.learned is not None else {}),
        "model": model_description(cfg, tuning.setup.model),
        "class_labels": cfg.get("class_labels"),
        "precision": cfg.get("precision", "float32"),
        "selection": {
            "features": tuning.select.describe(),
            "seeds": str(settings.select_seeds),
            "rounds": [int(n) for n in settings.rounds],
            "fid": best.scores[last]["fid"],
            "search_seeds": str(settings.search_seeds),
        },
        "report": {
            "seeds": str(settings.report_seeds),
            "features": {label: space.describe() for label, space in tuning.report.items()},
            "skipped_features": tuning.skipped_spaces,
            "scores": best.report,
        },
        "timing": timing,
        "candidates": [candidate_row(candidate) for candidate in candidates],
        "settings": OmegaConf.to_container(settings, resolve=True),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def candidate_table(summary: dict[str, Any], report_label: str | None) -> str:
    """The candidates of one budget, best first: selection FID per round and the held-out report."""
    candidates = [c for c in summary["candidates"] if c.skipped is None]
    candidates.sort(key=lambda c: (-max(c.scores, default=0), c.last_fid()))
    counts = sorted({n for c in candidates for n in c.scores})
    head = f"{'candidate':<50} {'steps':>5} " + " ".join(f"{f'fid@{n}':>10}" for n in counts)
    head += f" {'report ' + report_label if report_label else '':>18}"
    lines = [f"NFE {summary['nfe']}: {len(candidates)} candidates", head]
    for c in candidates:
        cells = " ".join(f"{c.scores[n]['fid']:>10.4g}" if n in c.scores else f"{'-':>10}" for n in counts)
        report = c.report["fid"][report_label]["fid"] if c.report else math.nan
        mark = " <- selected" if c is summary["best"] else ""
        held = f"{report:>18.4g}" if math.isfinite(report) else f"{'':>18}"
        lines.append(f"{c.key:<50} {c.sampler.steps:>5} {cells} {held}{mark}")
    skipped = [c for c in summary["candidates"] if c.skipped is not None]
    if skipped:
        lines.append(f"skipped: {len(skipped)} ({skipped[0].key}: {skipped[0].skipped.splitlines()[0]}, ...)")
    return "\n".join(lines)
