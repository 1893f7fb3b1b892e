"""Training throughput: Lightning (DiffusionModule + Trainer) vs a plain PyTorch loop, on the CPU.

Both loops train the same network (conf/net/unet_fmnist.yaml by default) with the same EDM loss,
Adam and EMA update (the plain loop calls the module's own ``loss`` and optimizer, so only the loop
differs), on the same batches: Fashion-MNIST if it is installed, else sklearn's digits resized to 28.
Each run times ``--steps`` optimizer steps after ``--warmup`` untimed ones (data loading included);
runs alternate between the two loops so background load hits both alike, and the table reports medians.

    python bench/train_throughput.py                       # 8 timed steps x 2 repeats, batch 64
    python bench/train_throughput.py --steps 20 --repeats 3 --threads 2

Target: Lightning / plain >= 0.95.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pytorch_lightning as pl  # noqa: E402

from fastsample.data import ImageDataModule  # noqa: E402
from fastsample.data.datasets import FASHION_MNIST  # noqa: E402
from fastsample.lit.diffusion import DiffusionModule  # noqa: E402

TARGET_RATIO = 0.95


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--net", default=str(ROOT / "conf/net/unet_fmnist.yaml"), help="network config")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
    parser.add_argument("--repeats", type=int, default=2, help="runs per loop (interleaved)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    return parser.parse_args(argv)


def make_datamodule(batch_size: int, count: int) -> tuple[ImageDataModule, str]:
    """Fashion-MNIST when installed (else digits at 28x28), trimmed to ``count`` training images."""
    system = Path(FASHION_MNIST.system_dir)
    if any(system.glob("train-images-idx3-ubyte*")):
        name, resolution = "fashion_mnist", None
    else:
        name, resolution = "digits", 28
    datamodule = ImageDataModule(name, resolution=resolution, batch_size=batch_size, subset=count)
    datamodule.setup("fit")
    return datamodule, name if resolution is None else f"{name} resized to {resolution}"


def make_module(net_path: str) -> DiffusionModule:
    """The same initial model for every run (seeded)."""
    torch.manual_seed(0)
    return DiffusionModule(OmegaConf.load(net_path), objective="edm", lr=2e-4, warmup_steps=0)


def plain_loop(module: DiffusionModule, datamodule: ImageDataModule, warmup: int, steps: int) -> float:
    """Seconds for ``steps`` steps of a hand-written loop doing what DiffusionModule does per step."""
    module.train()
    optimizer = module.configure_optimizers()
    torch.manual_seed(1)
    batches = iter(datamodule.train_dataloader())
    start = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        batch = next(batches)
        loss = module.loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        module.ema.update_parameters(module.net)
    return time.perf_counter() - start


class StepTimer(pl.Callback):
    """Wall time from the end of step ``warmup`` - 1 (or the start of fit) to the end of the last step."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end = warmup, 0.0, 0.0

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if self.warmup == 0:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, *args) -> None:
        now = time.perf_counter()
        if trainer.global_step == self.warmup:
            self.start = now
        self.end = now


def lightning_loop(module: DiffusionModule, datamodule: ImageDataModule, warmup: int, steps: int) -> float:
    """Seconds for ``steps`` steps of ``Trainer.fit`` (no logger, checkpoints, progress bar or validation)."""
    timer = StepTimer(warmup)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=warmup + steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[timer],
    )
    torch.manual_seed(1)
    trainer.fit(module, datamodule=datamodule)
    return timer.end - timer.start


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    datamodule, data_name = make_datamodule(args.batch_size, args.batch_size * (args.warmup + args.steps))
    loops = {"plain PyTorch": plain_loop, "Lightning": lightning_loop}
    rates: dict[str, list[float]] = {name: [] for name in loops}
    for repeat in range(args.repeats):
        order = list(loops) if repeat % 2 == 0 else list(reversed(loops))  # interleave
        for name in order:
            seconds = loops[name](make_module(args.net), datamodule, args.warmup, args.steps)
            rates[name].append(args.steps * args.batch_size / seconds)
            print(f"repeat {repeat + 1}/{args.repeats} {name}: {rates[name][-1]:.1f} images/s", flush=True)
    medians = {name: statistics.median(values) for name, values in rates.items()}
    ratio = medians["Lightning"] / medians["plain PyTorch"]
    params = sum(p.numel() for p in make_module(args.net).net.parameters())
    print(
        f"\n{Path(args.net).stem} ({params / 1e6:.2f}M params), {data_name}, batch {args.batch_size}, "
        f"{args.steps} timed steps after {args.warmup}, {args.repeats} interleaved repeats, "
        f"{torch.get_num_threads()} threads\n"
    )
    print("| loop | images/s (median) | runs |")
    print("|---|---:|---|")
    for name, values in rates.items():
        print(f"| {name} | {medians[name]:.1f} | {', '.join(f'{v:.1f}' for v in values)} |")
    verdict = "meets" if ratio >= TARGET_RATIO else "below"
    print(f"\nratio Lightning / plain: {ratio:.3f} ({verdict} the {TARGET_RATIO} target)")


if __name__ == "__main__":
    main()
