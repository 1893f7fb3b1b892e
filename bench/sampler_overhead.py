"""Sampler overhead: wall time of a sampler / (NFE x one bare model call), per registered sampler.

A sampler should cost its model calls and nothing more; the target is <= 1.05. The model is a
small UNet (conf/net/unet_tiny.yaml at 28x28, EDM-wrapped) at batch 256 on the CPU. Bare
calls and sampler runs are interleaved so machine noise hits both alike.

    python bench/sampler_overhead.py [--batch 256] [--steps 10] [--repeats 3] [--samplers a,b]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from fastsample.diffusion import EDMDenoiser
from fastsample.samplers import SAMPLERS, Sampler
from fastsample.utils.seeding import SeedNoise


def build_model(image_size: int) -> EDMDenoiser:
    net_cfg = OmegaConf.load("conf/net/unet_tiny.yaml")
    net_cfg.image_size = image_size
    net = instantiate(net_cfg).eval()
    return EDMDenoiser(net, image_shape=(1, image_size, image_size)).requires_grad_(False)


def time_call(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(name: str, model: EDMDenoiser, batch: int, steps: int, repeats: int) -> dict[str, float]:
    sampler = Sampler(name, steps)
    sigmas = sampler.sigmas(model)
    noise_source = SeedNoise(range(batch))
    noise = noise_source.randn(model.image_shape)
    x, sigma = noise * 10, torch.full((batch,), 10.0)
    bare, runs = [], []
    with torch.no_grad():
        for _ in range(repeats):
            bare.append(statistics.median(time_call(lambda: model(x, sigma)) for _ in range(3)))
            generator = SeedNoise(range(batch))
            runs.append(
                time_call(lambda g=generator: sampler.sample(model, noise, sigmas=sigmas, generator=g))
            )
    call, run = statistics.median(bare), statistics.median(runs)
    return {"nfe": sampler.nfe, "call_s": call, "run_s": run, "overhead": run / (sampler.nfe * call)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--samplers", default=",".join(sorted(SAMPLERS)))
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_model(args.image_size)
    print(
        f"batch {args.batch}, {args.steps} steps, unet_tiny {args.image_size}x{args.image_size}, "
        f"{torch.get_num_threads()} threads\n"
    )
    print("| sampler | NFE | model call (s) | sampler run (s) | overhead |")
    print("|---|---:|---:|---:|---:|")
    for name in args.samplers.split(","):
        row = measure(name, model, args.batch, args.steps, args.repeats)
        print(
            f"| {name} | {row['nfe']} | {row['call_s']:.4f} | {row['run_s']:.3f} | {row['overhead']:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
