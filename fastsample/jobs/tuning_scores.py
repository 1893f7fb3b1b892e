"""Scoring for ``sample.py mode=tune``: feature spaces with their reference statistics, one generation
pass scored in several spaces, successive halving on nested seed sets, and the resume cache.

What it costs: every candidate's samples come from the model (``NFE x seeds`` network calls); the
features (a small CNN or the classifier) cost a few percent of that. So each candidate's samples are
generated once per seed set and scored in every space of the stage at once, the reference statistics
are computed once per space (``prepare_reference``'s cache), and candidates far behind on the first,
small seed set are dropped before the larger ones (:func:`halving_survivors`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from fastsample.jobs.evaluation import prepare_reference
from fastsample.jobs.setup import Setup
from fastsample.metrics import FeatureStats, frechet_distance
from fastsample.metrics.evaluator import Evaluator
from fastsample.utils.errors import UserError, fail
from fastsample.utils.instantiation import instantiate
from fastsample.utils.io import save_torch_atomic, write_json_atomic

log = logging.getLogger(__name__)


@dataclass
class Space:
    """A feature space: its label in the config, the evaluator (extractor + reference statistics)."""

    label: str
    evaluator: Evaluator

    @property
    def name(self) -> str:
        """The extractor's name with its weights hash (what the reference was made with)."""
        return self.evaluator.extractor.name

    def describe(self) -> dict[str, Any]:
        return {"features": self.name, "reference": self.evaluator.reference.describe()}


def build_space(
    cfg: DictConfig, label: str, node: DictConfig, split: str, device: torch.device, keep_features: int = 0
) -> Space:
    """One feature space from a ``conf/features`` node, with the cached reference of ``cfg.dataset``."""
    extractor = instantiate(node)
    evaluator = Evaluator(extractor, scores=("fid",), keep_features=keep_features, device=device)
    source = OmegaConf.create(
        {
            "dataset": OmegaConf.to_container(cfg.dataset, resolve=True),
            "split": split,
            "ref": None,
            "paths": {"cache_dir": cfg.paths.cache_dir},
        }
    )
    evaluator.reference = prepare_reference(source, evaluator)
    return Space(label, evaluator)


def build_report_spaces(cfg: DictConfig, device: torch.device) -> tuple[dict[str, Space], dict[str, str]]:
    """The report's spaces; an optional one (``tune.optional_features``) whose weights or package are
    missing is skipped, with the reason returned for the file."""
    settings = cfg.tune
    spaces, skipped = {}, {}
    for label, node in settings.report_features.items():
        if node is None:
            continue
        try:
            spaces[label] = build_space(cfg, label, node, settings.report_split, device)
        except (UserError, ImportError, OSError) as err:
            if label not in settings.optional_features:
                raise
            skipped[label] = str(err).splitlines()[0]
            log.warning("report features %s skipped: %s", label, skipped[label])
    if not spaces:
        fail("tune.report_features is empty; the report needs at least one feature space (e.g. classifier)")
    return spaces, skipped


@dataclass
class Usage:
    """Where the time goes: sample generation (the model) vs feature extraction, and model calls."""

    generate_s: float = 0.0
    features_s: float = 0.0
    model_calls: int = 0  # batched network calls
    sample_evaluations: int = 0  # network calls x batch rows

    def as_dict(self) -> dict[str, Any]:
        return {
            "generate_s": round(self.generate_s, 1),
            "features_s": round(self.features_s, 1),
            "model_calls": self.model_calls,
            "sample_evaluations": self.sample_evaluations,
        }


class CallCounter:
    """Counts the model's forward calls and their rows (a forward pre-hook: the model is not wrapped)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls, self.rows = 0, 0
        self.handle = model.register_forward_pre_hook(self._count)

    def _count(self, module: Any, args: tuple) -> None:
        self.calls += 1
        self.rows += len(args[0]) if args and isinstance(args[0], torch.Tensor) else 0


def generate_stats(
    setup: Setup,
    sampler: Any,
    seeds: Sequence[int],
    spaces: dict[str, Space],
    usage: Usage,
    counter: CallCounter,
    progress: Any = None,
) -> tuple[dict[str, FeatureStats], list[int]]:
    """Generate ``seeds`` with ``sampler`` (as every job does, :meth:`Setup.generate`) once and fold the
    samples' features into one accumulator per space; also returns the model calls of each batch."""
    runner = dataclasses.replace(setup, sampler=sampler)
    stats = {label: FeatureStats(0, keep_logits=len(seeds)) for label in spaces}
    calls_per_batch = []
    for first in range(0, len(seeds), setup.batch_size):
        batch = list(seeds[first : first + setup.batch_size])
        tick, calls, rows = time.perf_counter(), counter.calls, counter.rows
        with torch.no_grad():
            images = runner.generate(batch).float()
        usage.generate_s += time.perf_counter() - tick
        calls_per_batch.append(counter.calls - calls)
        usage.model_calls += counter.calls - calls
        usage.sample_evaluations += counter.rows - rows
        tick = time.perf_counter()
        for label, space in spaces.items():
            output = space.evaluator.extractor(images)
            stats[label].update(output["features"], output["logits"])
        usage.features_s += time.perf_counter() - tick
        if progress is not None:
            progress.update(len(batch))
    return stats, calls_per_batch


def space_scores(space: Space, stats: FeatureStats, labels: torch.Tensor | None) -> dict[str, float]:
    """FID of ``stats`` against the space's reference, and class accuracy where the space has logits."""
    reference = space.evaluator.reference
    with warnings.catch_warnings():
        # 64 samples in 128 dims: FID is biased and the covariance singular, but candidates are only
        # ever compared at equal sample counts, where it still ranks them (docs/tuning.md); computed
        # here, not by Evaluator.score_stats, which would warn and log that for every candidate
        warnings.filterwarnings("ignore", message="covariance of .* is singular")
        sigma = stats.sigma
    result = {"fid": float(frechet_distance(stats.mu, sigma, reference.mu, reference.sigma))}
    logits = stats.logits
    if labels is not None and logits is not None and len(logits) == len(labels):
        result["class_accuracy"] = float((logits.argmax(1) == labels.cpu().numpy()).mean())
    return result


# -- successive halving ----------------------------------------------------------------------------
def halving_survivors(
    scores: dict[str, float], keep: float, min_keep: int, drop_ratio: float | None
) -> list[str]:
    """The candidates that go on to the next, larger seed set: the best ``keep`` fraction (at least
    ``min_keep``), minus any whose FID is over ``drop_ratio`` times the best (far worse)."""
    finite = {key: value for key, value in scores.items() if math.isfinite(value)}
    ranked = sorted(finite, key=finite.get)
    if not ranked:
        return []
    kept = ranked[: max(min_keep, math.ceil(keep * len(ranked)))]
    if drop_ratio is not None:
        best = finite[ranked[0]]
        kept = [key for key in kept if finite[key] <= drop_ratio * best or key == ranked[0]]
    return kept


# -- resume cache ----------------------------------------------------------------------------------
def digest(payload: Any) -> str:
    """A short stable hash of JSON-able settings (cache keys)."""
    return hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class ScoreCache:
    """Finished work of a tuning run in ``<run dir>/tune-cache``: per-candidate scores (JSON) and the
    selection space's statistics (``.pt``, so a rerun extends a seed set instead of redoing it), and
    the searched schedules. Every entry is keyed by a hash of what it depends on; writes are atomic."""

    root: Path
    context: dict[str, Any] = field(default_factory=dict)  # model, labels, precision, spaces, seeds

    def _path(self, kind: str, payload: Any, suffix: str) -> Path:
        return self.root / kind / f"{digest({'context': self.context, 'payload': payload})}{suffix}"

    def load(self, kind: str, payload: Any) -> dict[str, Any] | None:
        path = self._path(kind, payload, ".json")
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None  # a damaged entry is recomputed

    def save(self, kind: str, payload: Any, content: dict[str, Any]) -> None:
        write_json_atomic(self._path(kind, payload, ".json"), content)

    def load_stats(self, payload: Any) -> FeatureStats | None:
        path = self._path("stats", payload, ".pt")
        if not path.is_file():
            return None
        try:
            return FeatureStats().load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        except (OSError, RuntimeError, KeyError):
            return None

    def save_stats(self, payload: Any, stats: FeatureStats) -> None:
        save_torch_atomic(self._path("stats", payload, ".pt"), stats.state_dict())
