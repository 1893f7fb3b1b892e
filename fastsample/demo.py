"""The embedded default (``make demo``): several samplers on the analytic Fashion-MNIST mixture.

Runs the ``sample.py`` job for each sampler at a similar NFE with the same seeds, and prints NFE,
wall time, images/s and two quality numbers that the exact mixture makes available: the mean
exact log-likelihood of the samples under the mixture (true samples score ``reference``) and the
RMS distance to a 200-step Heun solution from the same noise. Grids land in ``outputs/demo/``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir

from fastsample.samplers import Sampler
from fastsample.sampling import build_model, generate
from fastsample.utils.seeding import SeedNoise

SAMPLERS = [
    ("euler", 10),
    ("heun", 6),
    ("dpmpp_2m", 10),
    ("dpmpp_3m", 10),
    ("unipc", 10),
    ("ipndm", 10),
    ("ddpm", 10),
    ("edm_sde", 6),
    ("dpmpp_2m_sde", 10),
]
SEEDS = 64
ROOT = Path(__file__).resolve().parents[1]


def main(out_dir: str | None = None) -> None:
    out_dir = out_dir or time.strftime("outputs/demo/%Y-%m-%d_%H-%M-%S")
    rows, model, reference = [], None, None
    for name, steps in SAMPLERS:
        with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
            cfg = compose(
                "sample",
                overrides=[
                    f"sampler={name}",
                    f"sampler.steps={steps}",
                    f"seeds=0-{SEEDS - 1}",
                    f"output_dir={out_dir}/{name}",
                    "device=cpu",
                ],
            )
        if model is None:
            model = build_model(cfg, torch.device("cpu"))
            noise = SeedNoise(range(SEEDS)).randn(model.image_shape, dtype=torch.float64)
            with torch.no_grad():
                reference = Sampler("heun", 200).sample(model, noise).float()
        summary = generate(cfg)
        with np.load(Path(out_dir) / name / "samples.npz") as data:
            images = torch.from_numpy(data["images"]).permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.no_grad():
            loglik = float(model.log_prob(images.double()).mean()) / images[0].numel()
        rms = float((images - reference.clamp(-1, 1)).pow(2).mean().sqrt())
        rows.append(
            (name, steps, summary["nfe"], summary["wall_time_s"], summary["images_per_s"], loglik, rms)
        )
    true_samples, _ = model.sample(SEEDS, torch.Generator().manual_seed(0))
    true_loglik = float(model.log_prob(true_samples.clamp(-1, 1)).mean()) / true_samples[0].numel()
    print(f"\nanalytic Fashion-MNIST mixture, {SEEDS} seeds; true samples: log-lik/pixel {true_loglik:.3f}\n")
    print(
        "| sampler | steps | NFE | wall s | images/s | log-lik/pixel | RMS to 200-step Heun (ODE samplers) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, steps, nfe, wall, speed, loglik, rms in rows:
        print(f"| {name} | {steps} | {nfe} | {wall:.2f} | {speed} | {loglik:.3f} | {rms:.4f} |")
    print(f"\ngrids: {out_dir}/<sampler>/grid.png")


if __name__ == "__main__":
    main()
