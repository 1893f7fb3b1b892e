"""Measured convergence order of every ODE sampler on an analytic Gaussian mixture.

The mixture's denoiser is exact, so the error against a DOP853 solution (rtol = atol = 1e-12) of
the same probability-flow ODE is pure discretization error. Grid: Karras rho=7 from 80 to 0.02
without the final step to 0; the order is the least-squares slope of log error on log steps over
the three largest step counts (the asymptotic range).

    python bench/convergence_order.py [--steps 32,64,128,256]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from scipy.integrate import solve_ivp

from fastsample.diffusion.schedules import ScheduleSpec, make_sigmas
from fastsample.models.gmm import GaussianMixture
from fastsample.samplers import Sampler

CASES = [  # (label, sampler, knobs, theory)
    ("euler", "euler", {}, 1),
    ("heun", "heun", {}, 2),
    ("dpmpp_2m", "dpmpp_2m", {}, 2),
    ("dpmpp_3m", "dpmpp_3m", {}, 3),
    ("dpmpp_3m (anchor coefficient)", "dpmpp_3m", {"anchor_compatible": True}, 3),
    ("lms order 2", "lms", {"order": 2}, 2),
    ("lms order 3", "lms", {"order": 3}, 3),
    ("lms order 4", "lms", {"order": 4}, 4),
    ("unipc order 2 (no lower-order final)", "unipc", {"order": 2, "lower_order_final": False}, 3),
    ("ipndm order 4 (fixed coefficients)", "ipndm", {"order": 4}, 4),
]


def reference(model: GaussianMixture, x: torch.Tensor, sigma_max: float, sigma_min: float) -> torch.Tensor:
    shape = x.shape

    def field(sigma: float, flat: np.ndarray) -> np.ndarray:
        state = torch.from_numpy(flat).view(shape)
        return ((state - model(state, sigma)) / sigma).reshape(-1).numpy()

    solution = solve_ivp(
        field, (sigma_max, sigma_min), x.reshape(-1).numpy(), method="DOP853", rtol=1e-12, atol=1e-12
    )
    return torch.from_numpy(solution.y[:, -1]).view(shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="32,64,128,256,512")
    args = parser.parse_args()
    steps = [int(s) for s in args.steps.split(",")]
    model = GaussianMixture.toy("two_blobs", sigma_min=0.02, sigma_max=80.0)
    x = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 80.0
    target = reference(model, x, 80.0, 0.02)
    print("| sampler | theory | " + " | ".join(f"RMS error N={n}" for n in steps) + " | measured order |")
    print("|---|---:|" + "---:|" * len(steps) + "---:|")
    for label, name, knobs, theory in CASES:
        errors = []
        for n in steps:
            sampler = Sampler(name, n, **knobs)
            sigmas = make_sigmas(ScheduleSpec(), n, model, append_zero=False)
            errors.append(float((sampler.run(model, x.clone(), sigmas) - target).pow(2).mean().sqrt()))
        slope = -np.polyfit(np.log(steps[-3:]), np.log(errors[-3:]), 1)[0]  # asymptotic range
        print(f"| {label} | {theory} | " + " | ".join(f"{e:.2e}" for e in errors) + f" | {slope:.2f} |")


if __name__ == "__main__":
    main()
