"""Foreign benchmark models: diffusers ``UNet2DModel``s trained the way diffusers' examples train them.

fastsample's own Fashion-MNIST model is EDM-parametrized and easy to sample in few steps; users bring
discrete-time DDPM-style models instead. This job trains two such models on Fashion-MNIST,
class-conditional (``num_class_embeds=10``), with diffusers' own recipe (``train_unconditional.py``):
``DDPMScheduler.add_noise`` at uniform integer timesteps in [0, T), MSE on the scheduler's prediction
target, AdamW with warmup + cosine decay, an EMA copy of the weights. The result is a pipeline-style
``save_pretrained`` folder (``unet/`` + ``scheduler/``) that ``model=diffusers model.path=<folder>``
loads, exactly like a folder downloaded from the Hub.

Recipes (:data:`RECIPES`): ``eps_linear`` (epsilon prediction, linear betas 1e-4..0.02, T=1000) and
``v_cosine`` (v-prediction, ``squaredcos_cap_v2``). ``--quick`` shrinks a recipe to a tiny net and a
few steps (the test runs it end to end in seconds).

Training is a plain PyTorch loop (no Lightning: the point is diffusers' recipe, not ours). It resumes:
every ``checkpoint_every`` steps the state (weights, EMA, optimizer, step) is written atomically to
``<out>/checkpoint.pt``; batches are drawn from a generator seeded by (seed, step), so a resumed run
sees the same batches as an uninterrupted one. ``<out>/train.json`` is written last, when the folder is
complete.
"""

from __future__ import annotations

import argparse
import math
import shutil
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fastsample.data.datasets import build_dataset
from fastsample.models.diffusers_adapter import require_diffusers
from fastsample.utils.errors import fail
from fastsample.utils.io import atomic_path, remove_stale_temporaries, write_json_atomic

CHECKPOINT = "checkpoint.pt"
#: written last: its presence means unet/ and scheduler/ are complete
DONE = "train.json"


@dataclass(frozen=True)
class Recipe:
    """One foreign model: its noise table, prediction target, network and optimisation."""

    name: str
    prediction_type: str  # diffusers' epsilon | v_prediction
    beta_schedule: str  # diffusers' linear | squaredcos_cap_v2
    # sized for ~0.43 s/step on one CPU core (measured; (32, 64, 64) at batch 128 is 1.7 s/step)
    block_out_channels: tuple[int, ...] = (16, 32, 64)
    layers_per_block: int = 1
    attention: bool = True  # self-attention at the coarsest (7x7) level, as diffusers' DDPM UNets have
    norm_num_groups: int = 8
    steps: int = 3000
    batch_size: int = 64
    lr: float = 1.5e-3
    warmup: int = 200
    cycles: int = 1  # cosine cycles with warm restarts (each: warmup, then cosine decay to 0)
    weight_decay: float = 1e-6  # diffusers' train_unconditional.py default (adam_weight_decay)
    ema_decay: float = 0.999
    # diffusers' --snr_gamma (Min-SNR-gamma loss weights, train_text_to_image.py); None: plain MSE
    snr_gamma: float | None = None
    checkpoint_every: int = 200
    log_every: int = 50
    seed: int = 0
    subset: int | None = None  # first N training images (quick runs)


RECIPES = {
    # The eps model learns slower than the v model (docs/tuning.md): Min-SNR-5 because with plain MSE
    # the low-noise steps dominate its loss, and after 1200 steps its eps at sigma 20..157 still missed
    # each image's mean (DC) by 0.023 RMS, which an ODE integrates into a drift of ~3 (samples saturate
    # at any step count); two cosine cycles (6000 steps) because after one (3000) its converged ODE
    # samples were no better than 5-step ones (FID 0.075 vs 0.063): nothing left for a tuner to win.
    "eps_linear": Recipe("eps_linear", "epsilon", "linear", steps=6000, cycles=2, snr_gamma=5.0),
    "v_cosine": Recipe("v_cosine", "v_prediction", "squaredcos_cap_v2"),
}


def quick(recipe: Recipe) -> Recipe:
    """A tiny version of ``recipe`` that trains in seconds on CPU (tests, smoke runs)."""
    return replace(
        recipe,
        block_out_channels=(8, 16),
        attention=False,
        norm_num_groups=4,
        steps=4,
        batch_size=8,
        warmup=1,
        checkpoint_every=2,
        log_every=1,
        subset=64,
    )


# -- model, noise table, data -----------------------------------------------------------------------
def build_unet(recipe: Recipe) -> nn.Module:
    """A class-conditional 28x28x1 ``UNet2DModel`` (28 -> 14 -> 7 for three levels)."""
    diffusers = require_diffusers("the foreign-model recipe")
    levels = len(recipe.block_out_channels)
    down = ["DownBlock2D"] * levels
    up = ["UpBlock2D"] * levels
    if recipe.attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    torch.manual_seed(recipe.seed)
    return diffusers.UNet2DModel(
        sample_size=28,
        in_channels=1,
        out_channels=1,
        block_out_channels=tuple(recipe.block_out_channels),
        layers_per_block=recipe.layers_per_block,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        norm_num_groups=recipe.norm_num_groups,
        attention_head_dim=8,
        num_class_embeds=10,
    )


def build_noise_scheduler(recipe: Recipe) -> Any:
    """The training scheduler, as diffusers' examples build it (its other settings at their defaults)."""
    diffusers = require_diffusers("the foreign-model recipe")
    return diffusers.DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule=recipe.beta_schedule,
        prediction_type=recipe.prediction_type,
    )


def load_training_images(recipe: Recipe, root: str | None = None) -> tuple[Tensor, Tensor]:
    """All training images as one float tensor in [-1, 1] (N, 1, 28, 28) and their labels."""
    dataset = build_dataset("fashion_mnist", "train", root=root, subset=recipe.subset)
    images = dataset.images
    images = images.float() / 127.5 - 1 if images.dtype == torch.uint8 else images.float()
    return images.contiguous(), dataset.labels.clone()


def batch_indices(recipe: Recipe, step: int, size: int) -> Tensor:
    """The batch of ``step``: a function of (seed, step) only, so resuming replays the same data."""
    generator = torch.Generator().manual_seed(recipe.seed * 1_000_003 + step)
    return torch.randint(0, size, (recipe.batch_size,), generator=generator)


# -- one step -----------------------------------------------------------------------------------------
def diffusion_loss(
    unet: nn.Module,
    scheduler: Any,
    x0: Tensor,
    labels: Tensor,
    generator: Any,
    snr_gamma: float | None = None,
) -> Tensor:
    """diffusers' objective: noise at uniform integer timesteps, MSE on the prediction target
    (per-sample Min-SNR-gamma weights when ``snr_gamma`` is set, as diffusers' ``--snr_gamma``)."""
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=generator)
    noisy = scheduler.add_noise(x0, noise, t)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = scheduler.get_velocity(x0, noise, t)
    else:
        fail(f"foreign-model recipe: prediction_type={kind!r} is not trained")
    prediction = unet(noisy, t, class_labels=labels, return_dict=False)[0]
    if snr_gamma is None:
        return nn.functional.mse_loss(prediction, target)
    return (per_sample_mse(prediction, target) * min_snr_weights(scheduler, t, snr_gamma)).mean()


def per_sample_mse(prediction: Tensor, target: Tensor) -> Tensor:
    return (prediction.float() - target.float()).square().flatten(1).mean(1)


def min_snr_weights(scheduler: Any, t: Tensor, gamma: float) -> Tensor:
    """diffusers' Min-SNR weights: ``min(snr, gamma) / snr`` (epsilon), ``/ (snr + 1)`` (v)."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, t)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    return clipped / (snr + 1 if scheduler.config.prediction_type == "v_prediction" else snr)


def learning_rate_factor(recipe: Recipe, step: int) -> float:
    """Linear warmup, then cosine decay to zero (diffusers' ``get_scheduler("cosine")``), once per
    cycle: with ``cycles > 1`` the first ``steps / cycles`` steps are exactly a one-cycle run of that
    length, so a longer recipe continues a shorter one's checkpoint."""
    length = recipe.steps // recipe.cycles
    if step >= length * recipe.cycles:  # the remainder of steps not divisible by cycles
        return 0.0
    step %= length
    if step < recipe.warmup:
        return (step + 1) / recipe.warmup
    progress = (step - recipe.warmup) / max(1, length - recipe.warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, recipe: Recipe, step: int) -> None:
    """EMA with diffusers' warmup-free inverse-decay ramp ``min(decay, (1 + step) / (10 + step))``."""
    decay = min(recipe.ema_decay, (1 + step) / (10 + step))
    for target, source in zip(ema.parameters(), model.parameters(), strict=True):
        target.lerp_(source, 1 - decay)


# -- state ----------------------------------------------------------------------------------------------
@dataclass
class TrainState:
    """What a checkpoint holds (and what resumes a run)."""

    unet: nn.Module
    ema: nn.Module
    optimizer: torch.optim.Optimizer
    step: int = 0
    seconds: float = 0.0  # training wall time so far (all sessions)


def new_state(recipe: Recipe) -> TrainState:
    unet = build_unet(recipe)
    ema = build_unet(recipe).requires_grad_(False)
    ema.load_state_dict(unet.state_dict())
    optimizer = torch.optim.AdamW(
        unet.parameters(), lr=recipe.lr, betas=(0.9, 0.999), weight_decay=recipe.weight_decay
    )
    return TrainState(unet, ema, optimizer)


def save_checkpoint(state: TrainState, recipe: Recipe, path: Path) -> None:
    """Write the training state atomically (a killed run keeps the previous checkpoint)."""
    payload = {
        "recipe": asdict(recipe),
        "unet": state.unet.state_dict(),
        "ema": state.ema.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "step": state.step,
        "seconds": state.seconds,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def resume_state(recipe: Recipe, path: Path) -> TrainState:
    """A fresh state, or the one in ``path`` when it was written by the same recipe."""
    state = new_state(recipe)
    if not path.is_file():
        return state
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if not same_recipe(payload["recipe"], recipe):
        fail(f"{path} was written by another recipe ({payload['recipe']}); delete it or use another --out")
    state.unet.load_state_dict(payload["unet"])
    state.ema.load_state_dict(payload["ema"])
    state.optimizer.load_state_dict(payload["optimizer"])
    state.step, state.seconds = int(payload["step"]), float(payload["seconds"])
    return state


def same_recipe(saved: dict[str, Any], recipe: Recipe) -> bool:
    """Whether a checkpoint's recipe is ``recipe``; a setting added since it was written must be at its
    default (the checkpoint was trained with the default's behaviour)."""
    defaults = {item.name: item.default for item in fields(Recipe)}
    current = asdict(recipe)
    return all(saved.get(key, defaults[key]) == value for key, value in current.items())


def export_pipeline(state: TrainState, scheduler: Any, out: Path) -> None:
    """``save_pretrained`` the EMA UNet and the scheduler into ``out/unet`` and ``out/scheduler``.

    Both are written into a staging folder first and moved into place, so ``out`` never holds a
    half-written component under its final name.
    """
    staging = out / ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    state.ema.save_pretrained(staging / "unet")
    scheduler.save_pretrained(staging / "scheduler")
    for part in ("unet", "scheduler"):
        shutil.rmtree(out / part, ignore_errors=True)
        (staging / part).rename(out / part)
    staging.rmdir()


# -- the loop ---------------------------------------------------------------------------------------------
def train(recipe: Recipe, out: str | Path, data_root: str | None = None) -> dict[str, Any]:
    """Train ``recipe`` into ``out`` (resuming from ``out/checkpoint.pt``); returns the run summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    if (out / DONE).is_file() and (out / CHECKPOINT).is_file():
        state = resume_state(recipe, out / CHECKPOINT)
        if state.step >= recipe.steps:
            print(f"{recipe.name}: already trained ({state.step} steps) in {out}", flush=True)
            return summary(recipe, state, out)
    images, labels = load_training_images(recipe, data_root)
    scheduler = build_noise_scheduler(recipe)
    state = resume_state(recipe, out / CHECKPOINT)
    if state.step:
        print(f"{recipe.name}: resuming at step {state.step}/{recipe.steps}", flush=True)
    run_steps(recipe, state, scheduler, images, labels, out)
    export_pipeline(state, scheduler, out)
    info = summary(recipe, state, out)
    write_json_atomic(out / DONE, info)
    print(f"{recipe.name}: wrote {out} ({info['seconds_per_step']:.3f} s/step)", flush=True)
    return info


def run_steps(
    recipe: Recipe, state: TrainState, scheduler: Any, images: Tensor, labels: Tensor, out: Path
) -> None:
    """Optimise from ``state.step`` to ``recipe.steps``, checkpointing and logging on the way."""
    state.unet.train()
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(
        state.optimizer, lambda step: learning_rate_factor(recipe, step), last_epoch=state.step - 1
    )
    running, started = 0.0, time.perf_counter()
    while state.step < recipe.steps:
        index = batch_indices(recipe, state.step, len(images))
        generator = torch.Generator().manual_seed(recipe.seed * 1_000_003 + state.step + 7)
        loss = diffusion_loss(
            state.unet, scheduler, images[index], labels[index], generator, recipe.snr_gamma
        )
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(state.unet.parameters(), 1.0)  # diffusers' max_grad_norm
        state.optimizer.step()
        lr_schedule.step()
        update_ema(state.ema, state.unet, recipe, state.step)
        state.step += 1
        running += loss.item()
        now = time.perf_counter()
        state.seconds, started = state.seconds + now - started, now
        if state.step % recipe.log_every == 0 or state.step == recipe.steps:
            log_progress(recipe, state, running / recipe.log_every)
            running = 0.0
        if state.step % recipe.checkpoint_every == 0 or state.step == recipe.steps:
            save_checkpoint(state, recipe, out / CHECKPOINT)


def log_progress(recipe: Recipe, state: TrainState, loss: float) -> None:
    rate = state.seconds / max(1, state.step)
    left = rate * (recipe.steps - state.step) / 60
    print(
        f"{recipe.name} step {state.step}/{recipe.steps} loss {loss:.4f} "
        f"lr {state.optimizer.param_groups[0]['lr']:.2e} {rate:.3f} s/step ({left:.1f} min left)",
        flush=True,
    )


def summary(recipe: Recipe, state: TrainState, out: Path) -> dict[str, Any]:
    """What ``train.json`` records: the recipe, the steps and the training time."""
    parameters = sum(p.numel() for p in state.ema.parameters())
    return {
        "recipe": asdict(recipe),
        "steps": state.step,
        "train_seconds": round(state.seconds, 1),
        "seconds_per_step": state.seconds / max(1, state.step),
        "parameters": parameters,
        "threads": torch.get_num_threads(),
        "folder": str(out),
    }


# -- command line -----------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train the foreign benchmark models (diffusers UNets).")
    parser.add_argument("names", nargs="*", default=list(RECIPES), help=f"recipes: {', '.join(RECIPES)}")
    parser.add_argument("--out", default="outputs/foreign", help="parent folder: one <out>/<name> per model")
    parser.add_argument("--quick", action="store_true", help="tiny net, a few steps (tests, smoke runs)")
    parser.add_argument("--steps", type=int, default=None, help="override the recipe's step count")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--data-root", default=None, help="Fashion-MNIST folder (default: the usual lookup)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Train the named recipes one after the other; returns their summaries."""
    args = parse_args(argv)
    unknown = [name for name in args.names if name not in RECIPES]
    if unknown:
        fail(f"unknown foreign-model recipe(s) {unknown}; choose from: {', '.join(RECIPES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for name in args.names:
        recipe = quick(RECIPES[name]) if args.quick else RECIPES[name]
        if args.steps is not None:
            recipe = replace(recipe, steps=args.steps)
        results.append(train(recipe, Path(args.out) / name, args.data_root))
    return results
