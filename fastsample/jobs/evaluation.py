"""The evaluation job behind ``evaluate.py`` (``mode=ref|score|generate``), and the pieces the
benchmarks and schedule search reuse: :func:`build_evaluator`, :func:`prepare_reference`,
:func:`score_samples_path`."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn

from fastsample.jobs.distributed import score_sampler_distributed
from fastsample.jobs.setup import plan, resolve_device
from fastsample.lit.tracking import log_job
from fastsample.metrics import FeatureExtractor
from fastsample.metrics.evaluator import Evaluator, Reference, read_reference
from fastsample.utils.errors import check_choice, fail
from fastsample.utils.images import save_grid, to_uint8
from fastsample.utils.instantiation import instantiate
from fastsample.utils.io import write_json_atomic

MODES = ("ref", "score", "generate")
log = logging.getLogger(__name__)


def build_evaluator(cfg: Any, device: torch.device | None = None) -> Evaluator:
    """An :class:`Evaluator` (no reference yet): ``cfg.features`` the extractor, ``cfg.evaluator`` its
    settings."""
    extractor = instantiate(cfg.features)
    if isinstance(extractor, nn.Module) and not isinstance(extractor, FeatureExtractor):
        fail(
            f"metrics: {type(extractor).__name__} is not a feature extractor; "
            "use features=module with features.module._target_=<your module>"
        )
    settings = dict(cfg.get("evaluator") or {})
    settings.setdefault("batch_size", cfg.get("batch_size", 250))
    settings.setdefault("progress", bool(cfg.get("progress", False)))
    return Evaluator(extractor, None, device=device, **settings)


def dataset_key(dataset_cfg: Any) -> str:
    """A short hash of the dataset settings that change its images (not batch size / workers / flips)."""
    node = dataset_cfg if isinstance(dataset_cfg, dict) else OmegaConf.to_container(dataset_cfg, resolve=True)
    ignored = {"batch_size", "num_workers", "hflip", "seed", "download"}
    kept = {key: value for key, value in node.items() if key not in ignored}
    return hashlib.sha1(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:10]


def reference_datamodule(cfg: Any) -> Any:
    """The ``cfg.dataset`` DataModule without training augmentation (reference images are not flipped)."""
    overrides = {"hflip": False} if "hflip" in cfg.dataset else {}
    return instantiate(cfg.dataset, **overrides)


def prepare_reference(cfg: Any, evaluator: Evaluator) -> Reference:
    """``cfg.ref`` if given, else the stats of ``cfg.dataset`` / ``cfg.split``, cached in ``paths.cache_dir``.

    The cache file name carries the data set, split, extractor name and a hash of the dataset settings,
    so another extractor or another data configuration never picks up a stale file.
    """
    if cfg.get("ref"):
        return read_reference(cfg.ref)
    extractor = evaluator.extractor
    label = (
        extractor.name
        if extractor.weights_hash in extractor.name
        else (f"{extractor.name}-{extractor.weights_hash}")
    )
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", label)
    cache = (
        Path(cfg.paths.cache_dir)
        / "references"
        / f"{cfg.dataset.get('name', 'data')}-{cfg.split}-{dataset_key(cfg.dataset)}-{name}.npz"
    )
    if cache.is_file():
        ref = read_reference(cache)
        if (ref.features is not None or evaluator.keep_features == 0) and ref.extractor == extractor.name:
            return ref
    log.info(
        "building reference statistics of %s/%s with %s (once; cached at %s)",
        cfg.dataset.get("name", "data"),
        cfg.split,
        extractor.name,
        cache,
    )
    return evaluator.build_reference(reference_datamodule(cfg), split=cfg.split, path=cache)


def score_samples_path(evaluator: Evaluator, samples: str | os.PathLike) -> dict[str, float]:
    """Score a ``.npz`` of samples or a folder of images."""
    path = Path(samples)
    if path.is_dir():
        return evaluator.score_folder(path)
    return evaluator.score_npz(path)


def generate_and_score(
    cfg: Any, evaluator: Evaluator, device: torch.device
) -> tuple[dict[str, float] | None, dict]:
    """Sample ``cfg.seeds`` with the config's :func:`~fastsample.jobs.setup.plan` (as sample.py does)
    and score them on the fly; writes the first ``grid_size`` samples to ``<output_dir>/grid.png``.

    With ``cfg.trainer`` the seeds are sharded over Lightning processes (:mod:`fastsample.jobs.distributed`);
    the metrics are then ``None`` on ranks other than 0.
    """
    setup = plan(cfg, device=torch.device("cpu") if cfg.get("trainer") else device)
    preview = PreviewGrid(cfg.get("grid_size", 64))
    if cfg.get("trainer"):  # seeds and feature statistics over Lightning processes; None on ranks > 0
        metrics = score_sampler_distributed(cfg.trainer, evaluator, setup, on_batch=preview)
    else:
        metrics = setup.score(evaluator, on_batch=preview)
    info = {**setup.describe(), "seeds": f"{setup.seeds[0]}..{setup.seeds[-1]} ({len(setup.seeds)})"}
    if metrics is not None:
        preview.save(Path(cfg.output_dir) / "grid.png")
    return metrics, info


class PreviewGrid:
    """Keeps the first ``count`` generated images (image data only) as uint8 for ``grid.png``."""

    def __init__(self, count: int) -> None:
        self.count = int(count)
        self.images: list[np.ndarray] = []

    def __call__(self, images: torch.Tensor) -> None:
        kept = sum(len(batch) for batch in self.images)
        if images.ndim == 4 and kept < self.count:
            self.images.append(to_uint8(images[: self.count - kept].detach().float()))

    def save(self, path: Path) -> Path | None:
        """Write the grid (nothing for non-image data); returns the path written, if any."""
        if not self.images:
            return None
        save_grid(np.concatenate(self.images), path)
        return path


def log_to_loggers(cfg: Any, metrics: dict[str, Any], info: dict[str, Any]) -> None:
    """Send the resolved config and run info (hyperparameters), ``eval/<name>`` metrics and the sample
    grid (mode=generate) to the configured loggers (:func:`fastsample.lit.tracking.log_job`)."""
    grid = {"eval/samples": Path(cfg.output_dir) / "grid.png"} if cfg.get("mode") == "generate" else None
    log_job(cfg, metrics, "eval", info=info, images=grid)


def evaluate(cfg: Any) -> dict[str, Any]:
    """Run the evaluation job (``mode=ref|score|generate``); returns the summary (metrics.json's content).

    - ``ref``: reference statistics of ``dataset``/``split`` written to ``ref`` (default
      ``<output_dir>/reference.npz``);
    - ``score``: scores of ``samples`` (a ``.npz`` or an image folder) against ``ref`` (or the dataset's
      cached statistics when ``ref`` is null);
    - ``generate``: samples ``seeds`` with ``model`` + ``sampler`` and scores them on the fly.
    """
    check_choice("mode", cfg.mode, MODES)
    check_choice("split", cfg.split, ("train", "test"))
    out_dir = Path(cfg.output_dir)
    device = resolve_device(cfg.device)
    evaluator = build_evaluator(cfg, device)
    started = time.perf_counter()
    if cfg.mode == "ref":
        path = Path(cfg.ref) if cfg.get("ref") else out_dir / "reference.npz"
        ref = evaluator.build_reference(reference_datamodule(cfg), split=cfg.split, path=path)
        return {
            "mode": "ref",
            "reference": str(path),
            "describe": ref.describe(),
            "count": ref.count,
            "kept_features": 0 if ref.features is None else len(ref.features),
            "wall_time_s": round(time.perf_counter() - started, 3),
        }
    if cfg.get("trainer") and cfg.mode != "generate":
        fail(f"trainer= (distributed evaluation) applies to mode=generate, not mode={cfg.mode}; drop trainer")
    evaluator.reference = prepare_reference(cfg, evaluator)
    if cfg.mode == "score":
        if not cfg.get("samples"):
            fail("mode=score needs samples=<samples.npz or image folder>")
        metrics, info = score_samples_path(evaluator, cfg.samples), {"samples": str(cfg.samples)}
    else:
        metrics, info = generate_and_score(cfg, evaluator, device)
        if metrics is None:  # a rank > 0 of a distributed run: rank 0 writes and logs the results
            return {"mode": cfg.mode, "metrics": None, **info}
    summary = {
        "mode": cfg.mode,
        "metrics": metrics,
        **info,
        "extractor": evaluator.extractor.name,
        "reference": evaluator.reference.path,
        "reference_info": evaluator.reference.describe(),
        "device": str(device),
        "wall_time_s": round(time.perf_counter() - started, 3),
        "output_dir": str(out_dir),
    }
    write_json_atomic(out_dir / "metrics.json", summary)
    log_to_loggers(cfg, metrics, info)
    return summary


def format_metrics(metrics: dict[str, Any]) -> str:
    """One line, e.g. ``fid 12.34  kid_mean 0.0012  ...``."""
    parts = []
    for key, value in metrics.items():
        if isinstance(value, float):
            parts.append(f"{key} {value:.6g}")
        elif value is not None:
            parts.append(f"{key} {value}")
    return "  ".join(parts)
