"""Solver accuracy at NFE 20-50: fastsample's solvers against diffusers' multistep schedulers.

Analytic Gaussian mixtures (exact denoisers, float64): ``two_blobs`` and ``ring`` (2-D) and a low-rank
mixture fitted to sklearn's 8x8 digits (64-D). Every run starts from the same state ``x = sigma_max z``
at sigma_max = 157.4, the top of the linear-beta T = 1000 table that diffusers' schedulers use (their
'linspace' / 'trailing' grids start there), and its error is the RMS distance to the exact
probability-flow ODE solution (DOP853, rtol = atol = 1e-12, in log sigma) at the level where the run
ends: 0 (reached as ``D(x(1e-8), 1e-8)``) or, for diffusers' DEIS, the table's sigma_min 0.01.

diffusers' schedulers run their own loop (``set_timesteps`` / ``step``) with the default settings of
each class plus ``solver_order``; the mixture's denoiser is evaluated at the sigma each step uses, in
float64 (their table promoted to float64), so they are measured at their best arithmetic (DPM-Solver
still rounds its state to float32 per step). fastsample's solvers run on Karras (rho 7), log-linear and
diffusers' time-uniform grids over the same range, ending at 0.

    python bench/diffusers_accuracy.py [--nfe 20,30,40,50] [--samples 64] [--mixtures two_blobs,ring,digits]
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from functools import partial

import diffusers
import numpy as np
import torch
from scipy.integrate import solve_ivp

from fastsample.diffusion import DiscreteSchedule
from fastsample.diffusion.schedules import ScheduleSpec, make_sigmas
from fastsample.models.gmm import GaussianMixture
from fastsample.samplers import Sampler

TABLE = DiscreteSchedule("linear")
SIGMA_MAX, SIGMA_MIN = float(TABLE.sigmas[-1]), float(TABLE.sigmas[0])
TIME_UNIFORM = {"kind": "time_uniform", "spacing": "linspace", "convention": "multistep"}

#: (label, scheduler class, config): each class's defaults plus the order
DIFFUSERS = [
    ("DPM++2M (default)", "DPMSolverMultistepScheduler", {}),
    ("DPM++3M", "DPMSolverMultistepScheduler", {"solver_order": 3}),
    ("DPM++2M Karras", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    ("UniPC-2 (default)", "UniPCMultistepScheduler", {}),
    ("UniPC-3", "UniPCMultistepScheduler", {"solver_order": 3}),
    ("UniPC-3 Karras", "UniPCMultistepScheduler", {"solver_order": 3, "use_karras_sigmas": True}),
    ("UniPC-3 exponential", "UniPCMultistepScheduler", {"solver_order": 3, "use_exponential_sigmas": True}),
    ("DEIS-2 (default)", "DEISMultistepScheduler", {}),
    ("DEIS-3", "DEISMultistepScheduler", {"solver_order": 3}),
    ("DEIS-3 Karras", "DEISMultistepScheduler", {"solver_order": 3, "use_karras_sigmas": True}),
]
#: sigma grids diffusers computes itself (kept, in float32 as it stores them); else its timesteps' levels
OWN_SIGMAS = ("use_karras_sigmas", "use_exponential_sigmas")
#: (label, sampler, knobs, schedule)
OURS = [
    ("dpmpp_2m karras", "dpmpp_2m", {}, {"kind": "karras"}),
    ("dpmpp_3m karras", "dpmpp_3m", {}, {"kind": "karras"}),
    ("dpmpp_3m loglinear", "dpmpp_3m", {}, {"kind": "loglinear"}),
    ("dpmpp_3m time-uniform", "dpmpp_3m", {}, TIME_UNIFORM),
    ("unipc-3 karras", "unipc", {"order": 3}, {"kind": "karras"}),
    ("unipc-3 loglinear", "unipc", {"order": 3}, {"kind": "loglinear"}),
    ("unipc-3 time-uniform", "unipc", {"order": 3}, TIME_UNIFORM),
    ("deis-3 karras", "deis", {"order": 3}, {"kind": "karras"}),
    ("deis-3 loglinear", "deis", {"order": 3}, {"kind": "loglinear"}),
    ("deis-3 time-uniform", "deis", {"order": 3}, TIME_UNIFORM),
    ("deis-3 diffusers' grid", "deis", {"order": 3}, {**TIME_UNIFORM, "final_sigmas_type": "sigma_min"}),
    ("lms-4 karras", "lms", {"order": 4}, {"kind": "karras"}),
]


def mixture(name: str) -> GaussianMixture:
    """A 2-D toy mixture, or the low-rank mixture of the 8x8 digits (as tests/conftest.py fits it)."""
    if name != "digits":
        return GaussianMixture.toy(name, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float64)[:, None] / 8.0 - 1.0
    labels = torch.tensor(bunch.target)
    return GaussianMixture.fit(
        images, labels, rank=8, components_per_class=2, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX
    )


def exact(model: GaussianMixture, x: torch.Tensor, sigma_to: float) -> torch.Tensor:
    """The probability-flow ODE's solution from ``x`` at SIGMA_MAX to ``sigma_to`` (0: its limit)."""
    shape, end = x.shape, max(sigma_to, 1e-8)

    def field(log_sigma: float, flat: np.ndarray) -> np.ndarray:
        state = torch.from_numpy(flat).reshape(shape)
        return (state - model(state, math.exp(log_sigma))).reshape(-1).numpy()

    solution = solve_ivp(
        field,
        (math.log(SIGMA_MAX), math.log(end)),
        x.reshape(-1).numpy(),
        method="DOP853",
        rtol=1e-12,
        atol=1e-12,
    )
    state = torch.from_numpy(solution.y[:, -1].copy()).reshape(shape)
    return model(state, end) if sigma_to == 0 else state  # D(x(s), s) = x(0) + O(s^2)


def diffusers_run(model: GaussianMixture, x: torch.Tensor, name: str, config: dict, steps: int):
    """(final state in sigma space, its level) of a diffusers scheduler's loop on the mixture."""
    scheduler = getattr(diffusers, name)(**config)
    scheduler.alphas_cumprod = TABLE.abar.clone()
    scheduler.set_timesteps(steps)
    sigmas = scheduler.sigmas.double()
    if not any(config.get(key) for key in OWN_SIGMAS):  # time-uniform: the float64 table at its timesteps
        last = 0.0 if float(sigmas[-1]) == 0 else SIGMA_MIN
        sigmas = torch.cat([TABLE.sigmas[scheduler.timesteps], TABLE.sigmas.new_tensor([last])])
    scheduler.sigmas = sigmas
    latents = x / math.sqrt(1 + float(sigmas[0]) ** 2)
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            sigma = float(sigmas[i])
            state = latents * math.sqrt(1 + sigma**2)
            eps = (state - model(state, sigma)) / sigma
            latents = scheduler.step(eps, t, latents).prev_sample
    last = float(sigmas[-1])
    return latents * math.sqrt(1 + last**2), last


def our_run(model: GaussianMixture, x: torch.Tensor, name: str, knobs: dict, schedule: dict, steps: int):
    """(final state, its level) of a fastsample solver on ``schedule`` over diffusers' range."""
    spec = ScheduleSpec(**{"sigma_min": SIGMA_MIN, "sigma_max": SIGMA_MAX, **schedule})
    sigmas = make_sigmas(spec, steps, model)
    assert math.isclose(float(sigmas[0]), SIGMA_MAX, rel_tol=1e-12)
    with torch.no_grad():
        return Sampler(name, steps, **knobs).run(model, x, sigmas), float(sigmas[-1])


def errors(
    model: GaussianMixture, x: torch.Tensor, run: Callable, nfe: list[int], cache: dict
) -> list[float]:
    """RMS error against the exact solution at each run's final level, per NFE."""
    out = []
    for steps in nfe:
        final, level = run(steps)
        if level not in cache:
            cache[level] = exact(model, x, level)
        out.append(float((final - cache[level]).pow(2).mean().sqrt()))
    return out


def table(name: str, nfe: list[int], samples: int) -> None:
    """Print one mixture's table: every configuration's error per NFE, then the best of each side."""
    model = mixture(name)
    z = torch.randn(
        samples, *model.image_shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    x, cache = SIGMA_MAX * z, {}
    rows = {}
    for label, cls, config in DIFFUSERS:
        run = partial(diffusers_run, model, x, cls, config)
        rows[f"diffusers {label}"] = errors(model, x, run, nfe, cache)
    for label, sampler, knobs, schedule in OURS:
        run = partial(our_run, model, x, sampler, knobs, schedule)
        rows[f"fastsample {label}"] = errors(model, x, run, nfe, cache)
    print(f"\n### {name} ({samples} samples): RMS error to the exact ODE solution\n")
    print("| solver | " + " | ".join(f"NFE {n}" for n in nfe) + " |")
    print("|---|" + "---:|" * len(nfe))
    for label, values in rows.items():
        print(f"| {label} | " + " | ".join(f"{v:.2e}" for v in values) + " |")
    best = {side: best_per_nfe(rows, side, len(nfe)) for side in ("diffusers", "fastsample")}
    for side, values in best.items():
        print(f"| **best {side}** | " + " | ".join(f"{v:.2e} ({label})" for v, label in values) + " |")
    ratios = [ours[0] / theirs[0] for ours, theirs in zip(best["fastsample"], best["diffusers"])]
    print("| best fastsample / best diffusers | " + " | ".join(f"{r:.2f}" for r in ratios) + " |")


def best_per_nfe(rows: dict[str, list[float]], side: str, count: int) -> list[tuple[float, str]]:
    """(error, configuration) of the most accurate configuration of ``side`` at each NFE."""
    mine = {label.split(" ", 1)[1]: values for label, values in rows.items() if label.startswith(side)}
    return [min((values[k], label) for label, values in mine.items()) for k in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nfe", default="20,30,40,50")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--mixtures", default="two_blobs,ring,digits")
    args = parser.parse_args()
    torch.set_num_threads(1)
    nfe = [int(n) for n in args.nfe.split(",")]
    for name in args.mixtures.split(","):
        table(name, nfe, args.samples)


if __name__ == "__main__":
    main()
