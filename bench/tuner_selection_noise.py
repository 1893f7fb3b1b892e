"""How many seeds does the tuner's first round need to rank candidates right?

Generates ``--seeds`` selection seeds (the tuner's, ``tune.select_seeds``) with a few candidates of the tuner
and scores them in its selection space (``tune.select_features`` on ``tune.select_split``). Then, per seed
count n, splits the seeds into disjoint sets of n and compares every candidate with the best one (at all
seeds) on the same seeds, as the tuner's rounds do: the table gives the mean paired FID difference, its
spread across the sets, and how often the better candidate scored better ("right").

    python bench/tuner_selection_noise.py --model outputs/foreign/eps_linear          # ~3 CPU-min
    python bench/tuner_selection_noise.py --model outputs/foreign/v_cosine --nfe 10

Candidates are tuner labels ``solver/variant/family`` (conf/tune/default.yaml; ``+<final>`` as in the
tuner's candidate table).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastsample.jobs.benchmark import compose  # noqa: E402
from fastsample.jobs.setup import plan  # noqa: E402
from fastsample.jobs.tuning_candidates import (  # noqa: E402
    build_candidate,
    family_entries,
    solver_entries,
    variant_entries,
)
from fastsample.jobs.tuning_scores import build_space  # noqa: E402
from fastsample.metrics import frechet_distance  # noqa: E402
from fastsample.utils.errors import fail, run_cli  # noqa: E402
from fastsample.utils.seeding import parse_seeds  # noqa: E402

CANDIDATES = (
    "unipc_2/default/leading_ms+sigma_min",  # diffusers' UniPC grid on a 'leading' scheduler config
    "unipc_2/default/linspace_ms",
    "dpmpp_2m/default/linspace_ms",
    "ipndm/default/loglinear_80",
    "deis_3/default/loglinear_80",
    "dpmpp_2m/default/quadratic+sigma_min",
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a diffusers folder (model=diffusers model.path=...)")
    parser.add_argument("--nfe", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=1024, help="selection seeds generated per candidate")
    parser.add_argument("--sizes", default="64,128,256", help="seed counts of the paired comparisons")
    parser.add_argument("--candidates", default=",".join(CANDIDATES))
    parser.add_argument(
        "overrides", nargs="*", help="extra config overrides (e.g. tune.select_features.grid=4)"
    )
    return parser.parse_args(argv)


def candidate_sampler(settings, label: str, nfe: int, model):
    """The tuner's candidate ``solver/variant/family`` at ``nfe`` model calls."""
    solver, variant, family = label.split("/")
    solvers, families = solver_entries(settings), family_entries(settings)
    if solver not in solvers or family not in families:
        fail(f"--candidates: {label!r} is not a tuner candidate; solvers: {', '.join(solvers)}")
    name, knobs = solvers[solver]
    extra = variant_entries(settings, name).get(variant)
    if extra is None:
        fail(f"--candidates: {name} has no variant {variant!r}")
    candidate = build_candidate(
        (solver, variant, family), name, {**knobs, **extra}, families[family], nfe, model
    )
    if candidate.skipped:
        fail(f"--candidates: {label} cannot run: {candidate.skipped}")
    return candidate.sampler


def selection_features(setup, sampler, seeds: list[int], space, batch: int = 256) -> np.ndarray:
    runner = dataclasses.replace(setup, sampler=sampler)
    rows = []
    for start in range(0, len(seeds), batch):
        with torch.no_grad():
            images = runner.generate(seeds[start : start + batch]).float()
        rows.append(space.evaluator.extractor(images)["features"].double().cpu())
    return torch.cat(rows).numpy()


def fid(features: np.ndarray, reference) -> float:
    return frechet_distance(features.mean(0), np.cov(features, rowvar=False), reference.mu, reference.sigma)


def paired_table(features: dict[str, np.ndarray], reference, sizes: list[int]) -> list[str]:
    full = {label: fid(rows, reference) for label, rows in features.items()}
    best = min(full, key=full.get)
    lines = [f"selection FID on all {len(features[best])} seeds; best: {best}", ""]
    lines += ["| candidate | FID (all) | " + " | ".join(f"n={n}: diff, spread, right" for n in sizes) + " |"]
    lines += ["|---|---:|" + "---|" * len(sizes)]
    for label, rows in features.items():
        cells = []
        for n in sizes:
            sets = range(len(rows) // n)
            diffs = np.array(
                [
                    fid(rows[s * n : (s + 1) * n], reference)
                    - fid(features[best][s * n : (s + 1) * n], reference)
                    for s in sets
                ]
            )
            cells.append(f"{diffs.mean():+.4f}, {diffs.std():.4f}, {(diffs > 0).mean():.0%} of {len(diffs)}")
        if label == best:
            cells = ["-"] * len(sizes)
        lines.append(f"| {label} | {full[label]:.4f} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    overrides = ["model=diffusers", f"model.path={args.model}", "class_labels=cycle", "+tune=default"]
    cfg = compose(overrides + list(args.overrides))
    settings = cfg.tune
    seeds = parse_seeds(settings.select_seeds)[: args.seeds]
    torch.set_num_threads(max(1, torch.get_num_threads()))
    setup = plan(cfg, seeds=seeds)
    space = build_space(cfg, "select", settings.select_features, settings.select_split, setup.device)
    labels = [label for label in args.candidates.split(",") if label]
    features = {}
    for label in labels:
        sampler = candidate_sampler(settings, label, args.nfe, setup.model)
        features[label] = selection_features(setup, sampler, seeds, space)
        print(f"  generated {label} ({len(seeds)} seeds, NFE {args.nfe})", flush=True)
    sizes = [int(n) for n in args.sizes.split(",")]
    print("\n".join(paired_table(features, space.evaluator.reference, sizes)))


if __name__ == "__main__":
    run_cli(main)
