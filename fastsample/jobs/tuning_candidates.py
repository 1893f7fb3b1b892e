"""The candidates of ``sample.py mode=tune``: solver x few-step knobs x schedule family from the config,
plus schedules searched for the leading solvers (GITS / AYS on shared teacher trajectories, the
quality search on the selection features) and a GGDM sampler learned from the leader's grid (DDSS on the
same features).

Every candidate is a :class:`~fastsample.samplers.tuned.TunedSampler` (a solver with its knobs on an
explicit grid, or the learned GGDM's coefficients): what is scored is bit for bit what the tuned-sampler
file runs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from fastsample.diffusion.schedules import ScheduleSpec, make_sigmas
from fastsample.samplers import SAMPLERS, Sampler, get_sampler
from fastsample.samplers.ggdm import GGDMSampler
from fastsample.samplers.tuned import TunedSampler, ggdm_learned_state
from fastsample.schedule_search.ays import ays_search
from fastsample.schedule_search.gits import gits_search, step_costs
from fastsample.schedule_search.quality import QualityObjective, descent_settings, learn_ggdm, quality_search
from fastsample.schedule_search.trajectories import Trajectories, steps_for_nfe
from fastsample.utils.errors import UserError, fail

log = logging.getLogger(__name__)

#: searched-schedule methods the tuner runs (schedule_search's algorithms)
SEARCH_METHODS = ("gits", "ays", "quality", "ggdm")


@dataclass
class Candidate:
    """One configuration scored by the tuner: solver label, few-step variant, schedule family."""

    solver: str  # label in tune.solvers
    variant: str  # label in tune.variants
    family: str  # label in tune.schedules, or a search method
    name: str  # registry solver name
    knobs: dict[str, Any]
    schedule: dict[str, Any]  # the family's settings (hand-designed) or the method's report (searched)
    sampler: TunedSampler | None = None
    skipped: str | None = None  # why it did not run (unreachable NFE, a grid the solver refuses, ...)
    scores: dict[int, dict[str, float]] = field(default_factory=dict)  # seeds -> selection scores
    report: dict[str, Any] | None = None  # held-out scores (finalists)
    dropped_at: int | None = None  # seed count of the round it was dropped after

    @property
    def key(self) -> str:
        return f"{self.solver}/{self.variant}/{self.family}"

    @property
    def searched(self) -> bool:
        return self.family in SEARCH_METHODS

    @property
    def setting(self) -> dict[str, Any]:
        """What identifies the candidate's run (cache keys, duplicates): solver, all its knobs (defaults
        included), the exact grid."""
        if self.sampler is None:
            return {"name": self.name, "knobs": self.knobs, "schedule": self.schedule}
        setting = {
            "name": self.name,
            "knobs": self.sampler.solver_knobs,
            "sigmas": self.sampler.grid.tolist(),
        }
        if self.sampler.learned is not None:  # a learned GGDM sampler: its coefficients too
            setting["learned"] = self.sampler.learned
        return setting

    def last_fid(self) -> float:
        """Selection FID on the largest seed set it was scored on (inf when never scored)."""
        return self.scores[max(self.scores)]["fid"] if self.scores else float("inf")


def plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})


def solver_entries(settings: DictConfig) -> dict[str, tuple[str, dict[str, Any]]]:
    """``tune.solvers``: label -> (registry name, knobs); stochastic or unknown solvers are refused."""
    entries = {}
    for label, node in settings.solvers.items():
        if node is None:
            continue  # removed with ~tune.solvers.<label> or tune.solvers.<label>=null
        knobs = plain(node)
        name = knobs.pop("name", label)
        spec = get_sampler(name)
        if spec.stochastic:
            fail(f"tune.solvers.{label}: {name!r} is stochastic; the tuner compares ODE solvers")
        unknown = sorted(set(knobs) - set(spec.knobs()))
        if unknown:
            allowed = ", ".join(sorted(spec.knobs())) or "none"
            fail(f"tune.solvers.{label}.{unknown[0]} is not a setting of {name!r}; allowed: {allowed}")
        entries[label] = (name, knobs)
    if not entries:
        fail("tune.solvers is empty; list at least one ODE solver (e.g. dpmpp_2m)")
    return entries


def variant_entries(settings: DictConfig, name: str) -> dict[str, dict[str, Any]]:
    """The few-step variants (``tune.variants``) that solver ``name`` has every knob of."""
    allowed = set(SAMPLERS[name].knobs())
    entries = {}
    for label, node in settings.variants.items():
        knobs = plain(node) if node is not None else None
        if knobs is not None and set(knobs) <= allowed:
            entries[label] = knobs
    return entries


def build_candidate(
    label: tuple[str, str, str],
    name: str,
    knobs: dict[str, Any],
    family: dict[str, Any],
    nfe: int,
    model: Any,
) -> Candidate:
    """The candidate at budget ``nfe``: the step count the solver's NFE rule gives, the family's grid."""
    candidate = Candidate(*label, name=name, knobs=knobs, schedule=family)
    try:
        base = Sampler(name, 1, dict(family), **knobs)
        steps = steps_for_nfe(base, nfe)
        grid = make_sigmas(base.schedule, steps, model)
        candidate.sampler = TunedSampler(name, grid, knobs)
    except UserError as err:
        candidate.skipped = str(err)
    return candidate


def family_entries(settings: DictConfig) -> dict[str, dict[str, Any]]:
    """Schedule family x final level (``tune.schedules`` x ``tune.finals``): label -> schedule settings.

    The plain final (no settings) keeps the family's label; others are ``<family>+<final>``.
    """
    families = {}
    finals = {
        label: plain(node)
        for label, node in (settings.get("finals") or {"zero": {}}).items()
        if node is not None
    }
    for label, node in settings.schedules.items():
        if node is None:
            continue
        for final, extra in finals.items():
            families[f"{label}+{final}" if extra else label] = {**plain(node), **extra}
    return families


def cross_candidates(
    settings: DictConfig,
    nfe: int,
    model: Any,
    solvers: list[str] | None = None,
    variants: list[str] | None = None,
    families: list[str] | None = None,
) -> list[Candidate]:
    """solver x variant x family at ``nfe`` model calls (``None``: all of the config's); a pair whose
    NFE is unreachable or whose grid the schedule refuses is kept as skipped, with the reason."""
    candidates = []
    all_families = family_entries(settings)
    for solver, (name, knobs) in solver_entries(settings).items():
        if solvers is not None and solver not in solvers:
            continue
        for variant, extra in variant_entries(settings, name).items():
            if variants is not None and variant not in variants:
                continue
            for family, schedule in all_families.items():
                if families is None or family in families:
                    label = (solver, variant, family)
                    candidates.append(build_candidate(label, name, {**knobs, **extra}, schedule, nfe, model))
    return unique(candidates)


def unique(candidates: list[Candidate]) -> list[Candidate]:
    """The candidates without repeats: a variant that sets a knob to its default (``lower_order_final``
    of UniPC) runs the very same sampler as the plain one; the first label is kept."""
    seen, kept = set(), []
    for candidate in candidates:
        identity = json.dumps(candidate.setting, sort_keys=True, default=str)
        if identity not in seen:
            seen.add(identity)
            kept.append(candidate)
    return kept


def screen_candidates(settings: DictConfig, nfe: int, model: Any) -> list[Candidate]:
    """Stage 1: every family with the screening solvers (``tune.screen.solvers``, their first variant);
    all solver x variant x family pairs at once when ``tune.screen.solvers`` is null."""
    screen = settings.screen
    if screen.solvers is None:
        return cross_candidates(settings, nfe, model)
    first_variant = next(iter(settings.variants))
    return cross_candidates(settings, nfe, model, list(screen.solvers), [first_variant])


def best_families(candidates: list[Candidate], top: int) -> list[str]:
    """The ``top`` families of the best-scored screening candidates."""
    families: list[str] = []
    for candidate in sorted((c for c in candidates if c.scores), key=Candidate.last_fid):
        if candidate.family not in families:
            families.append(candidate.family)
    return families[:top]


def leading_configs(candidates: list[Candidate], top: int) -> list[Candidate]:
    """The best-scored candidate of each of the ``top`` best (solver, variant) pairs."""
    ranked = sorted((c for c in candidates if c.scores and not c.searched), key=Candidate.last_fid)
    leaders, seen = [], set()
    for candidate in ranked:
        if (candidate.solver, candidate.variant) not in seen:
            seen.add((candidate.solver, candidate.variant))
            leaders.append(candidate)
    return leaders[:top]


# -- searched schedules ----------------------------------------------------------------------------
@dataclass
class SearchContext:
    """What the searches share across solvers and NFEs: the teacher, the quality objective, settings."""

    settings: DictConfig  # tune.search
    model: Any
    guidance: Any
    floor: float  # the lowest positive level a gradient search may move to
    make_teacher: Callable[[], Trajectories] | None = None
    objective: QualityObjective | None = None
    validation_seeds: list[int] = field(default_factory=list)
    costs: dict[str, Tensor] = field(default_factory=dict)  # GITS cost matrix per solver config
    _teacher: Trajectories | None = None

    @property
    def progress(self) -> bool:
        return bool(self.settings.get("progress", True))

    @property
    def teacher(self) -> Trajectories:
        """The teacher trajectories, computed on first use (a resumed run with cached searches needs none)."""
        if self._teacher is None:
            if self.make_teacher is None:
                fail("GITS / AYS need teacher trajectories; none were set up")
            self._teacher = self.make_teacher()
        return self._teacher


def ending_at_zero(grid: Tensor) -> Tensor:
    """The grid a search starts from: the leader's, its last level set to 0 when it ends at sigma_min
    (``final_sigmas_type=sigma_min``; same step count). AYS, the quality search and GGDM move levels
    above a final 0 and parametrize the last positive level themselves."""
    start = grid.clone()
    start[-1] = 0.0
    return start


def search_grid(context: SearchContext, method: str, leader: Candidate) -> tuple[Tensor, dict[str, Any]]:
    """The grid ``method`` finds for the leader's solver at its step count (AYS / quality start from
    the leader's own grid: the best hand-designed schedule of that solver)."""
    settings, model, guidance = context.settings, context.model, context.guidance
    init = ending_at_zero(leader.sampler.grid)
    sampler = Sampler(
        leader.name, leader.sampler.steps, ScheduleSpec(kind="explicit", sigmas=init.tolist()), **leader.knobs
    )
    common = {"batch_size": settings.batch_size, "progress": context.progress}
    if method == "gits":
        key = repr((leader.name, sorted(leader.knobs.items())))
        if key not in context.costs:  # per solver config; shared by every NFE
            context.costs[key], _ = step_costs(sampler, model, context.teacher, guidance=guidance, **common)
        return gits_search(
            sampler,
            model,
            context.teacher,
            guidance=guidance,
            cost=context.costs[key],
            refine_sweeps=settings.gits.refine_sweeps,
            **common,
        )
    if method == "ays":
        return ays_search(
            sampler,
            model,
            context.teacher.subset(settings.ays.trajectories),
            init,
            sigma_floor=context.floor,
            guidance=guidance,
            iterations=settings.ays.iterations,
            lr=settings.ays.lr,
            **common,
        )
    objective = dataclasses.replace(context.objective, sampler=sampler)
    return quality_search(objective, init, sigma_floor=context.floor, **descent_options(context, "quality"))


def descent_options(context: SearchContext, method: str) -> dict[str, Any]:
    """The KID descent's settings of ``tune.search.<method>`` (quality, ggdm), shared validation seeds."""
    options = descent_settings(context.settings[method])
    return {**options, "validation_seeds": context.validation_seeds, "progress": context.progress}


def learned_sampler(context: SearchContext, leader: Candidate) -> tuple[GGDMSampler, dict[str, Any]]:
    """DDSS at the leader's budget: a GGDM sampler initialized as DDIM on the leader's grid (ending at 0),
    its coefficients and levels learned on the selection features' KID (:func:`learn_ggdm`)."""
    settings = context.settings.ggdm
    sampler = GGDMSampler(
        ending_at_zero(leader.sampler.grid),
        sigma_data=float(getattr(context.model, "sigma_data", 0.5)),
        learn_pred=settings.learn_pred,
        learn_time=settings.learn_time,
        learn_noise=False,  # the tuner compares deterministic samplers
        init=leader.family,
    )
    return learn_ggdm(context.objective, sampler, **descent_options(context, "ggdm"))


def searched_candidate(context: SearchContext, method: str, leader: Candidate, cache: Any) -> Candidate:
    """``method``'s schedule for the leader's solver as a candidate (cached: a rerun reuses the grid);
    ``ggdm``: a sampler learned from the leader's grid (cached with its parameters)."""
    if method == "ggdm":
        return learned_candidate(context, leader, cache)
    candidate = Candidate(leader.solver, leader.variant, method, leader.name, dict(leader.knobs), {})
    payload = {"method": method, "leader": leader.setting, "settings": plain(context.settings)}
    found = cache.load("search", payload)
    if found is None:
        tick = time.perf_counter()
        try:
            sigmas, report = search_grid(context, method, leader)
        except UserError as err:
            candidate.skipped = f"{method} search failed: {err}"
            return candidate
        report = {key: value for key, value in report.items() if not key.endswith("history")}
        found = {"sigmas": sigmas.tolist(), "report": report, "wall_s": round(time.perf_counter() - tick, 1)}
        cache.save("search", payload, found)
    candidate.schedule = {
        "method": method,
        "init": leader.family,
        "wall_s": found["wall_s"],
        **found["report"],
    }
    try:
        candidate.sampler = TunedSampler(leader.name, found["sigmas"], leader.knobs)
    except UserError as err:
        candidate.skipped = str(err)
    return candidate


def learned_candidate(context: SearchContext, leader: Candidate, cache: Any) -> Candidate:
    """The GGDM sampler learned from the leader's grid as a candidate (cached: a rerun reuses it)."""
    candidate = Candidate(leader.solver, leader.variant, "ggdm", GGDMSampler.name, {}, {})
    payload = {"method": "ggdm", "leader": leader.setting, "settings": plain(context.settings)}
    found = cache.load("search", payload)
    if found is None:
        tick = time.perf_counter()
        try:
            sampler, report = learned_sampler(context, leader)
        except UserError as err:
            candidate.skipped = f"ggdm search failed: {err}"
            return candidate
        report = {key: value for key, value in report.items() if not key.endswith("history")}
        found = {
            "sigmas": sampler.sigmas().tolist(),
            "knobs": sampler.settings(),
            "learned": ggdm_learned_state(sampler),
            "report": report,
            "wall_s": round(time.perf_counter() - tick, 1),
        }
        cache.save("search", payload, found)
    candidate.knobs = found["knobs"]
    candidate.schedule = {
        "method": "ggdm",
        "init": leader.family,
        "wall_s": found["wall_s"],
        **found["report"],
    }
    candidate.sampler = TunedSampler(
        GGDMSampler.name, found["sigmas"], found["knobs"], learned=found["learned"]
    )
    return candidate
