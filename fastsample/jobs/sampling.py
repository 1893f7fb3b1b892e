"""The sampling job behind ``sample.py``: the config's :func:`~fastsample.jobs.setup.plan`, generated
by seed, saved.

Samples are generated in batches of seeds; each finished batch is written as a shard (atomic),
so memory stays flat in the number of samples and a rerun with the same config only generates
the missing seeds. The final ``samples.npz`` (uint8 images, labels, seeds) is streamed together
from the shards; ``grid.png`` and ``run.json`` are written last.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from fastsample.guidance import GuidanceTask
from fastsample.jobs.setup import plan
from fastsample.utils.images import save_grid, to_uint8
from fastsample.utils.io import save_npz_atomic, write_json_atomic
from fastsample.utils.npz import stream_npz
from fastsample.utils.run_state import claim_sample_dir

log = logging.getLogger(__name__)


def shard_path(shard_dir: Path, batch: list[int]) -> Path:
    """The shard file of one batch of seeds."""
    return shard_dir / f"seeds-{batch[0]:08d}-{batch[-1]:08d}.npz"


def generate(cfg: DictConfig) -> dict[str, Any]:
    """Run the sampling job described by ``cfg``; returns the run summary (also in run.json)."""
    setup = plan(cfg)
    out_dir = Path(cfg.output_dir)
    shard_dir = out_dir / "shards"
    batches = setup.batches
    # refuses a folder made with other settings (their shards would mix with ours under one name)
    planned = {shard_path(shard_dir, batch): len(batch) for batch in batches}
    run_state = claim_sample_dir(cfg, out_dir, planned)
    start, generated = time.perf_counter(), 0
    log.info(
        "sampling %d seeds with %s (NFE %s) in %d batches -> %s",
        len(setup.seeds),
        setup.sampler.name,
        setup.sampler.nfe,
        len(batches),
        out_dir,
    )
    # A bar in images (total and ETA); shards an interrupted run finished count as done at once. Closed
    # on an error too (``with``), so the ``error:`` line is not glued to the bar.
    bar = tqdm(total=len(setup.seeds), desc=f"sampling {setup.sampler.name}", unit="img", leave=False)
    with bar:
        for batch in batches:
            shard = shard_path(shard_dir, batch)
            if not shard.exists():  # else finished by an earlier, interrupted run of the same config
                with torch.no_grad():
                    images = setup.generate(batch)
                save_shard(shard, images, setup.labels_for(batch), batch)
                generated += len(batch)
                run_state.progress()
            bar.update(len(batch))
    elapsed = time.perf_counter() - start
    log.info(
        "%d samples generated in %.1f s (%d already there)", generated, elapsed, len(setup.seeds) - generated
    )
    finish_outputs(cfg, [shard_path(shard_dir, batch) for batch in batches])
    summary = {
        **setup.describe(),
        "samples": len(setup.seeds),
        "generated_this_run": generated,
        "wall_time_s": round(elapsed, 3),
        "images_per_s": round(generated / elapsed, 2) if generated and elapsed > 0 else None,
        "device": str(setup.device),
        "output_dir": str(out_dir),
    }
    if isinstance(setup.guidance, GuidanceTask):
        summary["guidance"].update(setup.guidance.stats.as_dict())  # totals of this run (all its batches)
    write_json_atomic(out_dir / "run.json", summary)
    run_state.finish()
    return summary


def finish_outputs(cfg: DictConfig, shards: list[Path]) -> None:
    """Stream the finished shards into ``samples.npz`` and write ``grid.png`` (run.json comes last)."""
    out_dir = Path(cfg.output_dir)
    stream_npz(shards, out_dir / "samples.npz")
    save_first_grid(shards, out_dir / "grid.png", cfg.get("grid_size", 64))


def save_shard(path: Path, images: torch.Tensor, labels: torch.Tensor | None, batch: list[int]) -> None:
    """One finished batch as a shard: uint8 images (or the raw arrays), labels (-1: none), seeds."""
    label_array = (labels if labels is not None else torch.full((len(batch),), -1)).cpu().numpy()
    save_npz_atomic(
        path,
        images=to_uint8(images.float()) if images.ndim == 4 else images.cpu().numpy(),
        labels=label_array,
        seeds=np.asarray(batch),
    )


def save_first_grid(shards: list[Path], path: Path, count: int) -> None:
    """Save the first ``count`` samples (image data only) as a PNG grid."""
    images: list[np.ndarray] = []
    for shard in shards:
        with np.load(shard) as data:
            images.append(data["images"][: count - sum(map(len, images))])
        if sum(map(len, images)) >= count:
            break
    batch = np.concatenate(images)
    if batch.ndim == 4:
        save_grid(batch, path)
