"""The sampling job behind ``sample.py``: build model and sampler from config, generate by seed, save.

Samples are generated in batches of seeds; each finished batch is written as a shard (atomic),
so memory stays flat in the number of samples and a rerun with the same config only generates
the missing seeds. The final ``samples.npz`` (uint8 images, labels, seeds) is streamed together
from the shards; ``grid.png`` and ``run.json`` are written last.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from fastsample.accel import NetworkOptions, apply_network_options
from fastsample.guidance import GuidanceTask
from fastsample.samplers import Sampler
from fastsample.utils.errors import check_choice, fail
from fastsample.utils.images import save_grid, to_uint8
from fastsample.utils.instantiation import instantiate
from fastsample.utils.io import save_npz_atomic, write_json_atomic
from fastsample.utils.npz import stream_npz
from fastsample.utils.run_state import claim_sample_dir
from fastsample.utils.seeding import SeedNoise, parse_seeds


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; otherwise the named device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        fail(f"device={name!r} but no CUDA device is available; use device=cpu or device=auto")
    return torch.device(name)


def build_model(cfg: DictConfig, device: torch.device) -> torch.nn.Module:
    """Instantiate ``cfg.model`` (a :class:`fastsample.diffusion.Denoiser`) in eval mode on ``device``,
    with the config's network speed options (``network_precision``, ``channels_last``, ``compile``)."""
    model = instantiate(cfg.model)
    return apply_network_options(model.to(device).eval(), NetworkOptions.from_config(cfg))


def build_guidance(cfg: DictConfig) -> Any:
    """The guidance of ``cfg.guidance``: a :class:`~fastsample.guidance.GuidanceTask` (conf/guidance),
    a plain ``g(x, sigma, denoised)`` callable, or ``None`` for ``guidance=none``."""
    node = cfg.get("guidance")
    if node is None or "_target_" not in node:
        return None
    return instantiate(node)


def check_guidance(sampler: Sampler, guidance: Any) -> None:
    """Refuse sampler / guidance combinations that make no sense, before any sampling.

    Splitting samplers (ltsp, stsp) integrate a conditional function apart from the diffusion part:
    without guidance, or with a denoiser wrapper such as CFG, there is nothing to split.
    """
    from fastsample.samplers.splitting import SPLITTING, check_conditional

    if sampler.name not in SPLITTING:
        return
    if isinstance(guidance, GuidanceTask) and not guidance.conditional:
        fail(
            f"sampler={sampler.name} splits off a conditional function g, but guidance={guidance.name} is a "
            "denoiser wrapper with none; use a plain sampler (e.g. sampler=plms or dpmpp_2m) with it"
        )
    check_conditional(sampler.name, guidance)


def guidance_labels(cfg: DictConfig, seeds: list[int], model: Any, guidance: Any) -> torch.Tensor | None:
    """Class labels per seed: ``cfg.class_labels``; tasks that need targets default to ``cycle``."""
    mode = cfg.get("class_labels")
    if not isinstance(guidance, GuidanceTask) or not guidance.needs_labels:
        return labels_for(seeds, mode, getattr(model, "num_classes", None))
    return labels_for(seeds, "cycle" if mode is None else mode, guidance.num_classes(model))


def labels_for(seeds: list[int], mode: Any, num_classes: int | None) -> torch.Tensor | None:
    """Class labels per seed: ``None`` (unconditional), ``cycle`` (seed mod classes) or a fixed class."""
    if mode is None:
        return None
    if not num_classes:
        fail("class_labels is set but the model is not class-conditional; use class_labels=null")
    if mode == "cycle":
        return torch.tensor([seed % num_classes for seed in seeds])
    if not isinstance(mode, int) or not 0 <= mode < num_classes:
        fail(f"class_labels={mode!r} is not allowed; choose null, cycle or a class in [0, {num_classes - 1}]")
    return torch.full((len(seeds),), mode)


def data_shape(cfg: DictConfig, model: Any) -> tuple[int, ...]:
    """The shape of one sample: the model's, or ``cfg.shape`` checked against it."""
    shape = getattr(model, "image_shape", None)
    if cfg.get("shape") is not None:
        requested = tuple(cfg.shape)
        if shape is not None and requested != tuple(shape):
            fail(f"shape={list(requested)} does not match the model's data shape {list(shape)}")
        shape = requested
    if shape is None:
        fail("the model does not declare its data shape; set shape=[C,H,W]")
    return tuple(shape)


def generate_batch(
    sampler: Sampler,
    model: Any,
    seeds: list[int],
    shape: tuple[int, ...],
    labels: torch.Tensor | None,
    guidance: Any,
    device: torch.device,
) -> torch.Tensor:
    """Sample one batch of seeds; noise and stochastic steps come from per-seed generators.

    A :class:`~fastsample.guidance.GuidanceTask` is set up for the batch (targets, measurements) and
    decides what is integrated; a plain callable is added to the ODE as ``g(x, sigma, denoised)``.
    """
    noise_source = SeedNoise(seeds)
    noise = noise_source.randn(shape, device=device)
    if isinstance(guidance, GuidanceTask):
        run = guidance.setup(model, seeds=seeds, labels=labels, shape=shape, device=device, dtype=noise.dtype)
        samples = sampler.sample(
            run.denoiser,
            noise,
            cond=run.cond,
            guidance=run.guidance,
            generator=noise_source,
            sigmas=sampler.sigmas(model),
        )
    else:
        cond = {"class_labels": labels.to(device)} if labels is not None else None
        samples = sampler.sample(model, noise, cond=cond, guidance=guidance, generator=noise_source)
    return decode_samples(model, samples)


def decode_samples(model: Any, samples: torch.Tensor) -> torch.Tensor:
    """Latent models (``model=diffusers_t2i``) decode their samples to images; others return them as is."""
    decode = getattr(model, "decode_latents", None)
    return samples if decode is None else decode(samples)


def shard_path(shard_dir: Path, batch: list[int]) -> Path:
    """The shard file of one batch of seeds."""
    return shard_dir / f"seeds-{batch[0]:08d}-{batch[-1]:08d}.npz"


def describe_run(sampler: Sampler, model: Any, guidance: Any = None) -> dict[str, Any]:
    """What was sampled with what: recorded in run.json and in evaluation results."""
    description = {
        "sampler": sampler.name,
        "steps": sampler.steps,
        "nfe": sampler.nfe,
        "schedule": sampler.schedule.kind,
        "knobs": dict(sampler.knobs),
        "model": model.identity() if hasattr(model, "identity") else type(model).__name__,
    }
    if isinstance(guidance, GuidanceTask):
        description["guidance"] = guidance.describe()
    elif guidance is not None:
        description["guidance"] = {"name": type(guidance).__name__}
    if getattr(model, "network_options", None):
        description["network"] = dict(model.network_options)  # speed options that change the numerics
    return description


def generate(cfg: DictConfig) -> dict[str, Any]:
    """Run the sampling job described by ``cfg``; returns the run summary (also in run.json)."""
    check_choice("precision", cfg.get("precision", "float32"), ("float32", "float64"))
    out_dir = Path(cfg.output_dir)
    seeds = parse_seeds(cfg.seeds)
    if not seeds:
        fail("seeds is empty; give e.g. seeds=0-63")
    if cfg.batch_size < 1:
        fail(f"batch_size={cfg.batch_size} is not allowed; use a positive integer")
    device = resolve_device(cfg.device)
    sampler: Sampler = instantiate(cfg.sampler)
    guidance = build_guidance(cfg)
    check_guidance(sampler, guidance)  # before the model: a refused combination fails at once
    model = build_model(cfg, device)
    if cfg.get("precision") == "float64":
        model = model.double()
    shape = data_shape(cfg, model)
    labels = guidance_labels(cfg, seeds, model, guidance)
    shard_dir = out_dir / "shards"
    batches = [seeds[i : i + cfg.batch_size] for i in range(0, len(seeds), cfg.batch_size)]
    # refuses a folder made with other settings (their shards would mix with ours under one name)
    planned = {shard_path(shard_dir, batch): len(batch) for batch in batches}
    run_state = claim_sample_dir(cfg, out_dir, planned)
    position = {seed: i for i, seed in enumerate(seeds)}
    start, generated = time.perf_counter(), 0
    for batch in tqdm(batches, desc="sampling", disable=len(batches) < 2, unit="batch"):
        shard = shard_path(shard_dir, batch)
        if shard.exists():
            continue  # finished by an earlier, interrupted run of the same config
        batch_labels = labels[[position[s] for s in batch]] if labels is not None else None
        with torch.no_grad():
            images = generate_batch(sampler, model, batch, shape, batch_labels, guidance, device)
        label_array = (batch_labels if batch_labels is not None else torch.full((len(batch),), -1)).numpy()
        save_npz_atomic(
            shard,
            images=to_uint8(images.float()) if images.ndim == 4 else images.cpu().numpy(),
            labels=label_array,
            seeds=np.asarray(batch),
        )
        generated += len(batch)
        run_state.progress()
    elapsed = time.perf_counter() - start
    shards = [shard_path(shard_dir, batch) for batch in batches]
    stream_npz(shards, out_dir / "samples.npz")
    save_first_grid(shards, out_dir / "grid.png", cfg.get("grid_size", 64))
    summary = {
        **describe_run(sampler, model, guidance),
        "samples": len(seeds),
        "generated_this_run": generated,
        "wall_time_s": round(elapsed, 3),
        "images_per_s": round(generated / elapsed, 2) if generated and elapsed > 0 else None,
        "device": str(device),
        "output_dir": str(out_dir),
    }
    if isinstance(guidance, GuidanceTask):
        summary["guidance"].update(guidance.stats.as_dict())  # totals of this run (all its batches)
    write_json_atomic(out_dir / "run.json", summary)
    run_state.finish()
    return summary


@dataclass
class SamplingPlan:
    """What a sampling job generates, built once from the config: the distributed path
    (:mod:`fastsample.lit.sampling`) hands each process a block of ``batches``."""

    seeds: list[int]
    batches: list[list[int]]
    sampler: Sampler
    guidance: Any
    model: torch.nn.Module
    shape: tuple[int, ...]
    labels: torch.Tensor | None
    shard_dir: Path

    def batch_labels(self, batch: list[int]) -> torch.Tensor | None:
        """The labels of one batch of seeds (``None`` when unconditional)."""
        if self.labels is None:
            return None
        position = {seed: i for i, seed in enumerate(self.seeds)}
        return self.labels[[position[seed] for seed in batch]]

    def shards(self) -> list[Path]:
        """Every batch's shard file, in seed order."""
        return [shard_path(self.shard_dir, batch) for batch in self.batches]


def plan_sampling(cfg: DictConfig, device: torch.device) -> SamplingPlan:
    """Check the settings and build sampler, guidance and model as :func:`generate` does."""
    check_choice("precision", cfg.get("precision", "float32"), ("float32", "float64"))
    seeds = parse_seeds(cfg.seeds)
    if not seeds:
        fail("seeds is empty; give e.g. seeds=0-63")
    if cfg.batch_size < 1:
        fail(f"batch_size={cfg.batch_size} is not allowed; use a positive integer")
    sampler: Sampler = instantiate(cfg.sampler)
    guidance = build_guidance(cfg)
    check_guidance(sampler, guidance)  # before the model: a refused combination fails at once
    model = build_model(cfg, device)
    if cfg.get("precision") == "float64":
        model = model.double()
    return SamplingPlan(
        seeds=seeds,
        batches=[seeds[i : i + cfg.batch_size] for i in range(0, len(seeds), cfg.batch_size)],
        sampler=sampler,
        guidance=guidance,
        model=model,
        shape=data_shape(cfg, model),
        labels=guidance_labels(cfg, seeds, model, guidance),
        shard_dir=Path(cfg.output_dir) / "shards",
    )


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
