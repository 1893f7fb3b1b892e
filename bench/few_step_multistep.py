"""Few-step accuracy of the multistep solvers: RMS distance to a 400-step Heun solution, same noise.

Model: a low-rank Gaussian mixture fitted to sklearn's 8x8 digits (exact denoiser), 256 samples,
Karras grid. ``python bench/few_step_multistep.py``
"""

import torch

from fastsample.data import ImageDataModule
from fastsample.models.gmm import fit_from_datamodule
from fastsample.samplers import Sampler

CASES = [("dpmpp_2m", {}), ("dpmpp_3m", {}), ("dpmpp_3m", {"anchor_compatible": True}), ("unipc", {})]


def main() -> None:
    model = fit_from_datamodule(ImageDataModule("digits"), rank=16, components_per_class=2)
    noise = torch.randn(256, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    reference = Sampler("heun", 400).sample(model, noise)
    print("| steps | dpmpp_2m | dpmpp_3m (corrected) | dpmpp_3m (anchor coefficient) | unipc |")
    print("|---:|---:|---:|---:|---:|")
    for steps in (5, 10, 15, 20):
        errors = [
            float((Sampler(name, steps, **knobs).sample(model, noise) - reference).pow(2).mean().sqrt())
            for name, knobs in CASES
        ]
        print(f"| {steps} | " + " | ".join(f"{e:.3f}" for e in errors) + " |")


if __name__ == "__main__":
    main()
