"""Optimized vs hand-designed schedules on the analytic Fashion-MNIST mixture (exact denoiser).

For each solver and NFE: RMS distance of the samples to a high-accuracy ODE solution (Heun, 500
Karras steps) from the same noise, on held-out seeds that the searches never saw, for Karras rho=7,
log-SNR uniform, time-uniform (DDPM timesteps) and the schedules found by GITS (DP only, and DP +
refinement with the real solver) and AYS (gradient on log-sigmas, from Karras and from the GITS DP
path). The searches use teacher trajectories (DPM-Solver++(3M) on the refined candidate grid) from
other seeds. ``python bench/schedule_search_gmm.py`` (docs/schedules.md has the results).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from fastsample.diffusion.schedules import ScheduleSpec, make_sigmas, save_schedule_file
from fastsample.jobs.setup import build_model
from fastsample.samplers import Sampler
from fastsample.schedule_search import (
    Trajectories,
    ays_search,
    best_path,
    candidate_sigmas,
    final_rms,
    refine_path,
    step_costs,
    steps_for_nfe,
    teacher_trajectories,
)
from fastsample.utils.seeding import SeedNoise, parse_seeds

ROOT = Path(__file__).resolve().parents[1]
HAND = [("karras", {"kind": "karras", "rho": 7.0}), ("loglinear", {"kind": "loglinear"})]
HAND += [("time_uniform", {"kind": "time_uniform"})]


def load_mixture(dtype: torch.dtype) -> torch.nn.Module:
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("sample", overrides=["model=gmm_fmnist", "output_dir=/tmp/unused"])
    model = build_model(cfg, torch.device("cpu"))
    return model.double() if dtype == torch.float64 else model


def reference_set(model, seeds: list[int], dtype: torch.dtype, steps: int, batch: int) -> Trajectories:
    """Heun (``steps`` Karras steps) solutions from the seeds' noise: the accuracy reference."""
    noise = SeedNoise(seeds).randn(model.image_shape, dtype=dtype)
    heun = Sampler("heun", steps)
    with torch.no_grad():
        finals = [heun.sample(model, noise[i : i + batch]) for i in range(0, len(noise), batch)]
    return Trajectories(levels=heun.sigmas(model)[:-1], noise=noise, final=torch.cat(finals), seeds=seeds)


def sample_errors(sampler: Sampler, model, sigmas: torch.Tensor, reference: Trajectories) -> torch.Tensor:
    """Per-sample mean squared distance to the reference (the RMS is the root of their mean)."""
    with torch.no_grad():
        out = sampler.run(model, reference.noise * float(sigmas[0]), sigmas)
    return (out - reference.final).double().pow(2).flatten(1).mean(1)


def robust(errors: torch.Tensor, trim: float) -> tuple[float, float]:
    """Median per-sample RMS, and the RMS over all but the worst ``trim`` fraction of samples."""
    kept = errors.sort().values[: len(errors) - round(trim * len(errors))]
    return float(errors.median().sqrt()), float(kept.mean().sqrt())


def random_grid(steps: int, sigma_min: float, sigma_max: float, generator: torch.Generator) -> torch.Tensor:
    """A random ``steps``-step grid: flat-Dirichlet shares of log(sigma_max / sigma_min) as the gaps
    between the levels and the slack below the last one (any valid grid can be drawn)."""
    shares = -torch.rand(steps, generator=generator, dtype=torch.float64).log()
    gaps = (shares / shares.sum())[:-1] * math.log(sigma_max / sigma_min)
    below = (math.log(sigma_max) - gaps.cumsum(0)).exp()
    return torch.cat(
        [torch.tensor([sigma_max], dtype=torch.float64), below, torch.zeros(1, dtype=torch.float64)]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--solvers", default="dpmpp_2m,ipndm,unipc")
    parser.add_argument("--nfe", default="5,10")
    parser.add_argument("--seeds", default="100000-100255", help="search trajectories")
    parser.add_argument("--holdout", default="0-255", help="held-out evaluation seeds")
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--substeps", type=int, default=2)
    parser.add_argument("--refine-sweeps", type=int, default=3)
    parser.add_argument("--refine-trajectories", type=int, default=None)
    parser.add_argument("--ays-iterations", type=int, default=50)
    parser.add_argument("--ays-lr", type=float, default=0.1)
    parser.add_argument("--ays-trajectories", type=int, default=128)
    parser.add_argument(
        "--random-starts",
        type=int,
        default=0,
        help="also run AYS from this many random grids; the one with the lowest search RMS is a column",
    )
    parser.add_argument("--reference-steps", type=int, default=500)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--precision", default="float32", choices=("float32", "float64"))
    parser.add_argument("--save-dir", default=None, help="write the optimized schedules here")
    parser.add_argument("--trim", type=float, default=0.02, help="fraction of worst samples left out")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--cache", default=None, help="keep teacher + reference here (reruns skip them)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dtype = torch.float64 if args.precision == "float64" else torch.float32
    started = time.perf_counter()
    model = load_mixture(dtype)
    levels = candidate_sigmas(model.sigma_min, model.sigma_max, args.candidates)
    seeds, holdout_seeds = parse_seeds(args.seeds), parse_seeds(args.holdout)
    assert not set(seeds) & set(holdout_seeds), "held-out seeds must differ from the search seeds"
    key = [args.seeds, args.holdout, args.candidates, args.substeps, args.reference_steps, args.precision]
    cache = Path(args.cache) if args.cache else None
    if cache is not None and cache.exists() and torch.load(cache, weights_only=False)["key"] == key:
        search, reference, teacher_error = torch.load(cache, weights_only=False)["data"]
    else:
        search = teacher_trajectories(
            model,
            SeedNoise(seeds).randn(model.image_shape, dtype=dtype),
            levels,
            substeps=args.substeps,
            batch_size=args.batch,
            seeds=seeds,
            progress=args.progress,
        )
        reference = reference_set(model, holdout_seeds, dtype, args.reference_steps, args.batch)
        teacher_on_holdout = teacher_trajectories(
            model, reference.noise, levels, substeps=args.substeps, record=False, progress=False
        )
        teacher_error = float((teacher_on_holdout.final - reference.final).pow(2).mean().sqrt())
        if cache is not None:
            torch.save({"key": key, "data": (search, reference, teacher_error)}, cache)
    print(
        f"# setup: {len(seeds)} search trajectories ({search.teacher}), {len(holdout_seeds)} held-out seeds, "
        f"reference heun x {args.reference_steps}; teacher vs reference RMS {teacher_error:.2e}; "
        f"{time.perf_counter() - started:.0f} s",
        flush=True,
    )

    nodes = levels.tolist() + [0.0]
    grid_of = lambda path: torch.tensor([nodes[k] for k in path], dtype=torch.float64)  # noqa: E731
    columns = [name for name, _ in HAND] + ["GITS (DP)", "GITS", "AYS (Karras init)", "AYS (GITS init)"]
    if args.random_starts:
        columns.append(f"AYS (best of {args.random_starts} random starts)")
    rows = []
    for solver in args.solvers.split(","):
        base = Sampler(solver, 1)
        cost, calls = None, 0
        for nfe in map(int, args.nfe.split(",")):
            steps = steps_for_nfe(base, nfe)
            sampler = Sampler(solver, steps)
            grids: dict[str, torch.Tensor] = {}
            for name, spec in HAND:
                grids[name] = make_sigmas(ScheduleSpec(**spec), steps, model)
            timings = {}
            tick = time.perf_counter()
            if cost is None:  # the one-step cost of a solver does not depend on the step count
                cost, calls = step_costs(
                    sampler, model, search, batch_size=args.batch, progress=args.progress
                )
            path, _ = best_path(cost, steps)
            grids["GITS (DP)"] = grid_of(path)
            timings["cost"] = time.perf_counter() - tick
            tick = time.perf_counter()
            subset = search.subset(args.refine_trajectories)
            path, _, evaluations = refine_path(
                path,
                lambda p: final_rms(sampler, model, grid_of(p), subset, batch_size=args.batch),  # noqa: B023
                sweeps=args.refine_sweeps,
                progress=args.progress,
            )
            grids["GITS"] = grid_of(path)
            timings["refine"] = time.perf_counter() - tick
            inits = {"AYS (Karras init)": grids["karras"], "AYS (GITS init)": grids["GITS (DP)"]}
            generator = torch.Generator().manual_seed(nfe)
            inits.update(
                {
                    f"random start {k}": random_grid(steps, model.sigma_min, model.sigma_max, generator)
                    for k in range(args.random_starts)
                }
            )
            for label, init in inits.items():
                tick = time.perf_counter()
                grids[label], _ = ays_search(
                    sampler,
                    model,
                    search.subset(args.ays_trajectories),
                    init,
                    sigma_floor=model.sigma_min,
                    iterations=args.ays_iterations,
                    lr=args.ays_lr,
                    batch_size=args.batch,
                    progress=args.progress,
                )
                timings[label] = time.perf_counter() - tick
            starts = [grids.pop(f"random start {k}") for k in range(args.random_starts)]
            if starts:  # picked on the search trajectories, like every other method
                label = f"AYS (best of {len(starts)} random starts)"
                search_rms = [
                    final_rms(sampler, model, grid, search, batch_size=args.batch) for grid in starts
                ]
                grids[label] = starts[min(range(len(starts)), key=search_rms.__getitem__)]
                print(
                    f"# {solver} NFE {nfe} random starts, search RMS: "
                    + ", ".join(f"{v:.4f}" for v in search_rms)
                )
                timings[label] = sum(timings.pop(f"random start {k}") for k in range(len(starts)))
            per_sample = {
                name: sample_errors(sampler, model, grid, reference) for name, grid in grids.items()
            }
            errors = {name: float(e.mean().sqrt()) for name, e in per_sample.items()}
            rows.append((solver, nfe, steps, errors, per_sample))
            print(
                f"# {solver} NFE {nfe}: "
                + ", ".join(f"{k} {v:.4f}" for k, v in errors.items())
                + f" | cost {timings['cost']:.0f} s ({calls} model calls), refine {timings['refine']:.0f} s "
                f"({evaluations} runs), "
                + ", ".join(f"{k} {timings[k]:.0f} s" for k in timings if k.startswith("AYS")),
                flush=True,
            )
            for name in columns[len(HAND) :]:
                print(f"#   {name}: " + ", ".join(f"{s:.4g}" for s in grids[name].tolist()), flush=True)
            if args.save_dir:
                for name, method in (("GITS", "gits"), ("AYS (GITS init)", "ays")):
                    save_schedule_file(
                        Path(args.save_dir) / f"{solver}-nfe{nfe}-{method}.yaml",
                        grids[name],
                        sampler=solver,
                        nfe=nfe,
                        method=method,
                        model={"config": "gmm_fmnist", **model.identity()},
                        trajectories=len(seeds),
                        seeds=args.seeds,
                        holdout_seeds=args.holdout,
                        teacher=search.teacher,
                        features={"holdout": {"rms": errors[name], "karras_rms": errors["karras"]}},
                        source="bench/schedule_search_gmm.py",
                    )

    print(f"\n{len(holdout_seeds)} held-out seeds, RMS to Heun x {args.reference_steps} (same noise)\n")
    print("| solver | NFE | " + " | ".join(columns) + " | best optimized / Karras |")
    print("|---|---:|" + "---:|" * (len(columns) + 1))
    for solver, nfe, _, errors, _ in rows:
        best = min(errors[name] for name in columns[len(HAND) :])
        cells = []
        for name in columns:
            text = f"{errors[name]:.4f}"
            cells.append(f"**{text}**" if errors[name] == min(errors.values()) else text)
        print(f"| {solver} | {nfe} | " + " | ".join(cells) + f" | {best / errors['karras']:.2f} |")
    print(
        "\nWhere the error sits: per-sample RMS median, and the RMS without each schedule's worst "
        f"{args.trim:.0%} of samples (Karras vs the best optimized schedule of the row above)\n"
    )
    print(
        "| solver | NFE | best optimized | median Karras | median optimized | ratio | trimmed Karras "
        "| trimmed optimized | ratio |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for solver, nfe, _, errors, per_sample in rows:
        best = min(columns[len(HAND) :], key=lambda name: errors[name])  # noqa: B023
        (med_k, trim_k), (med_o, trim_o) = (
            robust(per_sample["karras"], args.trim),
            robust(per_sample[best], args.trim),
        )
        print(
            f"| {solver} | {nfe} | {best} | {med_k:.4f} | {med_o:.4f} | {med_o / med_k:.2f} | {trim_k:.4f} "
            f"| {trim_o:.4f} | {trim_o / trim_k:.2f} |"
        )
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
