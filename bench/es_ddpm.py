"""ES-DDPM (Lyu et al. 2022) on Fashion-MNIST: FID against NFE, the same seeds for every row.

Modes (``--mode``):

``fid`` (default): the reproduction. Rows, all with per-seed noise on seeds 0..N-1:
  prior                 the generator alone (the VAE by default): NFE 0
  ddpm (full)           ordinary ancestral DDPM, ``--full-steps`` (1000) respaced timesteps
  ddim                  ordinary DDIM at ``--ddim-steps`` (10-100)
  es_ddpm <solver> T'   the prior's x0' diffused to T' (``--t-prime``: 50,100,200,400), then
                        ``--steps`` solver steps (ancestral ``ddpm`` and ``ddim``) down to 0
  truncation <solver> T'  the control: the same from pure noise at T' (a N(0, I) prior, which is
                        exactly VP noise N(0, I) at T'), same seeds
Every grid is ``time_uniform`` with ``linspace`` spacing (the chain's timesteps T'-1 .. 0, both ends
included), so ES-DDPM at T' = T is the ordinary sampler. The summary tests the paper's claim:
the cheapest ES-DDPM row at least as good as the full DDPM (speed-up = full NFE / its NFE), the
rows that beat both the prior and the full DDPM, and ES-DDPM against naive truncation and DDIM.

``control``: a grid for docs (latent interpolation and pixel pastes, decoded by the prior and
then diffused to ``--edit-t-prime`` and denoised).

``truncated-training``: what ``task.max_timestep`` saves: two small models trained for the same
steps, on all timesteps and on t <= T' only, scored by the loss at t <= T' on held-out images
(fixed noise), for the EDM and the DDPM objective; prints the steps each needs to reach a level.

    python bench/es_ddpm.py                                  # GPU-sized: 10000 samples, unet_fmnist + VAE
    python bench/es_ddpm.py --quick                          # a CPU plumbing check (few samples, few rows)
    python bench/es_ddpm.py --prior-path outputs/pretrain/vae/model.pt --samples 5000
    python bench/es_ddpm.py --model gmm_fmnist --prior gmm --quick   # analytic model and prior
    python bench/es_ddpm.py --mode control --out docs        # writes es_ddpm_control.png
    python bench/es_ddpm.py --mode truncated-training        # digits, tiny UNet: CPU minutes

Unknown ``key=value`` arguments are Hydra overrides of conf/evaluate.yaml (e.g. ``device=cuda``,
``class_labels=cycle``: labels reach the model and a mixture prior, not the VAE). Writes
``es_ddpm.{csv,md,png}`` to ``--out`` and prints the markdown table and the summary.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastsample.jobs.benchmark import compose, exact_row, fmt, plot  # noqa: E402
from fastsample.utils.errors import run_cli  # noqa: E402

COLUMNS = ["curve", "family", "solver", "t_prime", "steps", "nfe", "fid", "kid", "sampling_s", "ms_per_image"]
FAMILIES = ("prior", "ddpm", "ddim", "es_ddpm", "truncation")
QUICK = {
    "samples": 100,
    "t_prime": "100,400",
    "steps": "10,25",
    "ddim_steps": "10,25",
    "full_steps": 100,
    "edit_steps": 25,
    "train_steps": 300,
}


@dataclass
class Run:
    """One scored row: its curve and the conf/evaluate overrides that build its sampler."""

    curve: str
    family: str
    solver: str
    t_prime: int | None
    steps: int
    overrides: list[str] = field(default_factory=list)


def ints(text: str) -> list[int]:
    return [int(item) for item in str(text).split(",") if item.strip()]


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", default="fid", choices=("fid", "control", "pairs", "truncated-training"))
    parser.add_argument(
        "--quick", action="store_true", help="CPU-sized settings (overridable): " + str(QUICK)
    )
    parser.add_argument("--model", default="unet_fmnist", help="conf/model config of the diffusion model")
    parser.add_argument(
        "--prior", default="vae", help="conf/prior config of the prior (vae | gmm | npz | ...)"
    )
    parser.add_argument(
        "--prior-path", default=None, help="sampler.prior.path (a VAE bundle / .npz); default: shipped"
    )
    parser.add_argument(
        "--samples", type=int, default=None, help="seeds 0..N-1 for every row (default 10000)"
    )
    parser.add_argument(
        "--t-prime", default=None, help="T' values of the ES-DDPM rows (default 50,100,200,400)"
    )
    parser.add_argument(
        "--steps", default=None, help="solver steps of the ES-DDPM rows (default 10,25,50,100; <= T')"
    )
    parser.add_argument(
        "--solvers", default="ddpm,ddim", help="ES-DDPM / truncation solvers (registry names)"
    )
    parser.add_argument("--ddim-steps", default=None, help="ordinary DDIM steps (default 10,20,50,100)")
    parser.add_argument("--full-steps", type=int, default=None, help="ordinary DDPM steps (default 1000)")
    parser.add_argument(
        "--families", default=",".join(FAMILIES), help=f"rows to run, from {', '.join(FAMILIES)}"
    )
    parser.add_argument("--metrics", default="classifier", help="conf/features config (feature extractor)")
    parser.add_argument("--split", default="test", help="reference split (test: 10k images)")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="outputs/bench/es_ddpm", help="output folder")
    # control
    parser.add_argument("--edit-t-prime", type=int, default=300, help="control: T' of the edits")
    parser.add_argument("--edit-steps", type=int, default=None, help="control: ancestral steps (default 100)")
    parser.add_argument("--edit-seeds", default="0,1,2,3,4,5", help="control: seeds of the base images")
    parser.add_argument("--grid-scale", type=int, default=3, help="control: pixel upscaling of the grid")
    # truncated training
    parser.add_argument("--train-dataset", default="digits", help="truncated-training: conf/dataset")
    parser.add_argument("--train-net", default="unet_tiny", help="truncated-training: conf/net")
    parser.add_argument(
        "--train-steps", type=int, default=None, help="truncated-training: steps (default 600)"
    )
    parser.add_argument("--train-t-prime", type=int, default=100, help="truncated-training: T'")
    args, overrides = parser.parse_known_args(argv)
    unknown = [item for item in overrides if item.startswith("--")]
    if unknown:
        parser.error(f"unknown option(s) {' '.join(unknown)}; Hydra overrides are written key=value")
    defaults = {
        "samples": 10000,
        "t_prime": "50,100,200,400",
        "steps": "10,25,50,100",
        "ddim_steps": "10,20,50,100",
        "full_steps": 1000,
        "edit_steps": 100,
        "train_steps": 600,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, QUICK[key] if args.quick else value)
    args.families = [name for name in args.families.split(",") if name]
    for name in args.families:
        if name not in FAMILIES:
            parser.error(f"--families: {name!r} is not one of {', '.join(FAMILIES)}")
    return args, overrides


# -- fid ------------------------------------------------------------------------------------------


def prior_overrides(args: argparse.Namespace, prior: str) -> list[str]:
    overrides = ["sampler=es_ddpm", f"prior@sampler.prior={prior}"]
    if prior == args.prior and args.prior_path:
        overrides.append(f"sampler.prior.path={args.prior_path}")
    return overrides


def plan_runs(args: argparse.Namespace) -> list[Run]:
    """Every row to score (the prior row is scored separately: it needs no sampler steps)."""
    schedule = ["sampler.schedule.kind=time_uniform", "sampler.schedule.spacing=linspace"]
    runs: list[Run] = []
    if "ddpm" in args.families:
        steps = args.full_steps
        runs.append(
            Run(
                "ddpm (full)",
                "ddpm",
                "ddpm",
                None,
                steps,
                ["sampler=ddpm", f"sampler.steps={steps}", *schedule],
            )
        )
    if "ddim" in args.families:
        runs += [
            Run("ddim", "ddim", "ddim", None, n, ["sampler=ddim", f"sampler.steps={n}", *schedule])
            for n in ints(args.ddim_steps)
        ]
    for family, prior in (("es_ddpm", args.prior), ("truncation", "gaussian")):
        if family not in args.families:
            continue
        for solver in [name for name in args.solvers.split(",") if name]:
            for t_prime in ints(args.t_prime):
                for steps in [n for n in ints(args.steps) if n <= t_prime]:
                    overrides = [
                        *prior_overrides(args, prior),
                        f"sampler.solver={solver}",
                        f"sampler.t_prime={t_prime}",
                        f"sampler.steps={steps}",
                        *schedule,
                    ]
                    runs.append(
                        Run(f"{family} {solver} T'={t_prime}", family, solver, t_prime, steps, overrides)
                    )
    return runs


def score_prior(args, base, evaluator, seeds, shape, device) -> dict:
    """FID of the prior's own samples x0' (the images ES-DDPM diffuses), same seeds."""
    import torch

    from fastsample.metrics.evaluator import _sync
    from fastsample.utils.instantiation import instantiate
    from fastsample.utils.seeding import SeedNoise

    sampler = instantiate(compose([*base, *prior_overrides(args, args.prior)]).sampler)
    timer = {"s": 0.0}

    def batches():
        for start in range(0, len(seeds), args.batch_size):
            chunk = seeds[start : start + args.batch_size]
            _sync(device)
            begin = time.perf_counter()
            with torch.no_grad():
                images = sampler.draw_prior(len(chunk), SeedNoise(chunk), shape, device=device)
            _sync(device)
            timer["s"] += time.perf_counter() - begin
            yield images.float()

    scores = evaluator.score_images(batches(), what=f"prior ({args.prior}) samples")
    return {
        "curve": f"prior ({args.prior})",
        "family": "prior",
        "solver": "",
        "t_prime": None,
        "steps": 0,
        "nfe": 0,
        "fid": scores["fid"],
        "kid": scores.get("kid_mean"),
        "sampling_s": timer["s"],
        "ms_per_image": 1000 * timer["s"] / len(seeds),
    }


def es_ddpm_fid(args: argparse.Namespace, overrides: list[str]) -> list[dict]:
    from fastsample.jobs.evaluation import build_evaluator, prepare_reference
    from fastsample.jobs.setup import build_guidance, build_model, data_shape
    from fastsample.utils.device import resolve_device
    from fastsample.utils.instantiation import instantiate
    from fastsample.utils.io import write_bytes_atomic
    from fastsample.utils.seeding import labels_for

    out = Path(args.out)
    seeds = list(range(args.samples))
    base = [
        f"model={args.model}",
        f"features={args.metrics}",
        f"split={args.split}",
        f"device={args.device}",
        f"batch_size={args.batch_size}",
        f"seeds={args.samples}",
        f"paths.output_dir={out}",
        "evaluator.scores=[fid,kid]",
        "evaluator.kid_subsets=50",
        "progress=false",
        *overrides,
    ]
    cfg = compose(base)
    runs = plan_runs(args)
    for run in runs:  # every setting is checked before any sampling
        instantiate(compose([*base, *run.overrides]).sampler)
    device = resolve_device(cfg.device)
    start = time.perf_counter()
    evaluator = build_evaluator(cfg, device)
    evaluator.reference = prepare_reference(cfg, evaluator)
    print(f"reference: {evaluator.reference.describe()} ({time.perf_counter() - start:.1f} s)", flush=True)
    model = build_model(cfg, device)
    shape = data_shape(cfg, model)
    labels = labels_for(seeds, cfg.get("class_labels"), getattr(model, "num_classes", None))
    guidance = build_guidance(cfg)
    print(
        f"model {args.model}, prior {args.prior}; {evaluator.extractor.name}; "
        f"{len(seeds)} samples on {device}"
    )
    print(f"{len(runs) + 1} rows", flush=True)

    rows: list[dict] = []
    if "prior" in args.families:
        rows.append(score_prior(args, base, evaluator, seeds, shape, device))
        print(
            f"  {rows[-1]['curve']:>28}: FID {rows[-1]['fid']:.4g} ({rows[-1]['sampling_s']:.2f} s)",
            flush=True,
        )
    exact = exact_row(model, evaluator, seeds, args.batch_size)
    if exact is not None:  # an analytic mixture: its exact samples give the FID floor of this size
        rows.append(
            {**exact, "curve": "exact mixture samples", "family": "exact", "solver": "", "t_prime": None}
        )
        print(f"  {'exact mixture samples':>28}: FID {exact['fid']:.4g}", flush=True)
    warm = instantiate(compose([*base, "sampler=euler", "sampler.steps=1"]).sampler)
    evaluator.score_sampler(model, warm, seeds[:4], shape=shape, device=device)  # first-call overheads
    for run in runs:
        sampler = instantiate(compose([*base, *run.overrides]).sampler)
        scores = evaluator.score_sampler(
            model,
            sampler,
            seeds,
            args.batch_size,
            shape=shape,
            class_labels=labels,
            guidance=guidance,
            device=device,
        )
        rows.append(
            {
                "curve": run.curve,
                "family": run.family,
                "solver": run.solver,
                "t_prime": run.t_prime,
                "steps": run.steps,
                "nfe": sampler.nfe,
                "fid": scores["fid"],
                "kid": scores.get("kid_mean"),
                "sampling_s": scores["sampling_s"],
                "ms_per_image": 1000 * scores["sampling_s"] / len(seeds),
            }
        )
        print(
            f"  {run.curve:>28} steps {run.steps:>4} NFE {sampler.nfe:>4}: FID {scores['fid']:.4g} "
            f"({scores['sampling_s']:.1f} s)",
            flush=True,
        )

    title = (
        f"{args.model} + {args.prior} prior, {len(seeds)} samples (seeds 0-{len(seeds) - 1}), "
        f"{evaluator.extractor.name}"
    )
    table, summary = markdown_table(rows), summarize(rows)
    write_csv(out / "es_ddpm.csv", rows)
    write_bytes_atomic(out / "es_ddpm.md", f"{title}\n\n{table}\n\n{summary}\n".encode())
    plot(out / "es_ddpm.png", [{**row, "sampler": row["curve"]} for row in rows if row["nfe"]], title)
    print(f"\n{table}\n\n{summary}")
    print(f"\nCSV: {out / 'es_ddpm.csv'}\nplot: {out / 'es_ddpm.png'}")
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    from fastsample.utils.io import write_bytes_atomic

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if row.get(key) is None else row[key] for key in COLUMNS})
    write_bytes_atomic(path, buffer.getvalue().encode())


def markdown_table(rows: list[dict]) -> str:
    lines = ["| curve | T' | steps | NFE | FID | KID | sampling s |", "|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(
            f"| {row['curve']} | {fmt(row.get('t_prime'))} | {row['steps']} | {row['nfe']} | "
            f"{fmt(row['fid'])} | "
            f"{fmt(row['kid'], 3)} | {fmt(row['sampling_s'], 3)} |"
        )
    return "\n".join(lines)


def describe(row: dict) -> str:
    where = f"T'={row['t_prime']}, " if row.get("t_prime") else ""
    return (
        f"{row['curve'].split(' T')[0]} ({where}{row['steps']} steps, NFE {row['nfe']}): FID {row['fid']:.4g}"
    )


def summarize(rows: list[dict]) -> str:
    """The paper's claim, measured: ES-DDPM vs its prior, the full DDPM, DDIM and naive truncation."""
    scored = [row for row in rows if row.get("fid") is not None and not math.isnan(row["fid"])]
    family = {name: [row for row in scored if row["family"] == name] for name in (*FAMILIES, "exact")}
    es, full, prior = family["es_ddpm"], family["ddpm"], family["prior"]
    lines = ["Summary:"]
    for name in ("prior", "ddpm", "ddim", "es_ddpm", "truncation", "exact"):
        if family[name]:
            lines.append(f"- best {name}: {describe(min(family[name], key=lambda row: row['fid']))}")
    if es and full:
        reference = max(full, key=lambda row: row["nfe"])
        good = [row for row in es if row["fid"] <= reference["fid"]]
        if good:
            cheapest = min(good, key=lambda row: (row["nfe"], row["fid"]))
            lines.append(
                f"- best speed-up at equal or better FID than the {reference['nfe']}-step DDPM "
                f"(FID {reference['fid']:.4g}): {reference['nfe'] / cheapest['nfe']:.1f}x with "
                f"{describe(cheapest)}"
            )
        else:
            best = min(es, key=lambda row: row["fid"])
            lines.append(
                f"- no ES-DDPM row reaches the {reference['nfe']}-step DDPM FID ({reference['fid']:.4g}); "
                f"best {describe(best)}"
            )
        ddim_good = [row for row in family["ddim"] if row["fid"] <= reference["fid"]]
        if ddim_good:
            cheapest = min(ddim_good, key=lambda row: row["nfe"])
            lines.append(
                f"- ordinary DDIM reaches it too: {reference['nfe'] / cheapest['nfe']:.1f}x with "
                f"{describe(cheapest)}"
            )
        if prior:
            both = [row for row in good if row["fid"] < prior[0]["fid"]]
            lines.append(
                f"- rows beating both the prior (FID {prior[0]['fid']:.4g}) and the full DDPM: "
                f"{len(both)} of {len(es)}"
                + (f" (from NFE {min(row['nfe'] for row in both)})" if both else "")
            )
    if es and family["truncation"]:
        control = {(row["solver"], row["t_prime"], row["steps"]): row for row in family["truncation"]}
        pairs = [
            (row, control[key])
            for row in es
            if (key := (row["solver"], row["t_prime"], row["steps"])) in control
        ]
        wins = sum(row["fid"] < other["fid"] for row, other in pairs)
        lines.append(
            f"- ES-DDPM beats naive truncation (pure noise at T') in {wins} of {len(pairs)} matched settings"
        )
    if es and family["ddim"]:
        wins = []
        for baseline in family["ddim"]:
            cheaper = [row for row in es if row["nfe"] <= baseline["nfe"]]
            if cheaper and min(row["fid"] for row in cheaper) < baseline["fid"]:
                wins.append(baseline["nfe"])
        lines.append(
            "- at equal or lower NFE, some ES-DDPM row beats ordinary DDIM at NFE "
            f"{', '.join(map(str, wins)) or 'none'}"
        )
    return "\n".join(lines)


# -- control ----------------------------------------------------------------------------------------


def control_grid(args: argparse.Namespace, overrides: list[str]) -> Path:
    """Latent interpolation and pixel pastes, then diffusion to T' and denoising: one PNG."""
    import torch

    from fastsample.jobs.setup import build_model, data_shape
    from fastsample.samplers.priors import LatentGenerator, interpolate_latents, paste
    from fastsample.utils.device import resolve_device
    from fastsample.utils.errors import fail
    from fastsample.utils.images import grid, save_png, to_uint8
    from fastsample.utils.instantiation import instantiate
    from fastsample.utils.seeding import SeedNoise

    out = Path(args.out)
    base = [f"model={args.model}", f"device={args.device}", f"paths.output_dir={out}", *overrides]
    cfg = compose(base)
    device = resolve_device(cfg.device)
    sampler = instantiate(
        compose(
            [
                *base,
                *prior_overrides(args, args.prior),
                f"sampler.t_prime={args.edit_t_prime}",
                f"sampler.steps={args.edit_steps}",
            ]
        ).sampler
    )
    model = build_model(cfg, device)
    shape = data_shape(cfg, model)
    prior = sampler.prior.bind(shape)
    if not isinstance(prior, LatentGenerator):
        fail(
            f"--mode control needs a prior with a latent space (vae, callable); --prior {args.prior} has none"
        )
    seeds = ints(args.edit_seeds)
    count = len(seeds)

    def denoise(x0: torch.Tensor, noise_seeds: list[int]) -> torch.Tensor:
        streams = SeedNoise(noise_seeds)
        noise = streams.randn(shape, device=device)
        with torch.no_grad():
            return sampler.sample(model, noise, generator=streams, x0=x0.to(device))

    with torch.no_grad():
        # semantic: interpolate between the latents of two seeds; the same diffusion noise per column
        z = prior.latents(2, SeedNoise(seeds[:2]), device=device)
        path = interpolate_latents(z[0], z[1], 8)
        decoded = prior.decode(path).float()
        interpolation = [decoded, denoise(decoded, [seeds[0]] * 8)]
        # local: paste the top half of one sample onto another
        bases = prior.sample(count, SeedNoise(seeds), device=device)
        sources = prior.sample(count, SeedNoise([seed + 100 for seed in seeds]), device=device)
        height = shape[1] // 2
        pasted = paste(bases, sources, 0, 0, height, shape[2])
        edits = [bases, sources, pasted, denoise(pasted, seeds)]
    rows = [row.float().cpu() for row in interpolation]
    rows += [
        torch.cat([row.float().cpu(), torch.full((8 - count, *shape), 1.0)])
        if count < 8
        else row[:8].float().cpu()
        for row in edits
    ]
    picture = grid(to_uint8(torch.cat(rows)), nrow=8)
    picture = picture.repeat(args.grid_scale, axis=0).repeat(args.grid_scale, axis=1)  # readable in docs
    path = out / "es_ddpm_control.png"
    save_png(picture, path)
    print(
        f"{path}: rows 1-2 latent interpolation (decoded / ES-DDPM from T'={args.edit_t_prime}), rows 3-6 "
        f"base / source / top half pasted / ES-DDPM from the paste ({args.edit_steps} ancestral steps)"
    )
    return path


def prior_pairs(args: argparse.Namespace, overrides: list[str]) -> Path:
    """Row 1: the prior's samples x0'; row 2: ES-DDPM from them (T' = --edit-t-prime), same seeds."""
    import torch

    from fastsample.jobs.setup import build_model, data_shape
    from fastsample.utils.device import resolve_device
    from fastsample.utils.images import grid, save_png, to_uint8
    from fastsample.utils.instantiation import instantiate
    from fastsample.utils.seeding import SeedNoise

    out = Path(args.out)
    base = [f"model={args.model}", f"device={args.device}", f"paths.output_dir={out}", *overrides]
    cfg = compose(base)
    device = resolve_device(cfg.device)
    settings = [f"sampler.t_prime={args.edit_t_prime}", f"sampler.steps={args.edit_steps}"]
    sampler = instantiate(compose([*base, *prior_overrides(args, args.prior), *settings]).sampler)
    model = build_model(cfg, device)
    shape = data_shape(cfg, model)
    seeds = ints(args.edit_seeds)
    streams = SeedNoise(seeds)
    with torch.no_grad():
        prior = sampler.draw_prior(len(seeds), streams, shape, device=device)
        denoised = sampler.sample(model, streams.randn(shape, device=device), generator=streams)
    picture = grid(to_uint8(torch.cat([prior.float().cpu(), denoised.float().cpu()])), nrow=len(seeds))
    picture = picture.repeat(args.grid_scale, axis=0).repeat(args.grid_scale, axis=1)
    path = out / f"es_ddpm_{args.prior}_pairs.png"
    save_png(picture, path)
    print(
        f"{path}: row 1 the {args.prior} prior's samples, row 2 ES-DDPM from them "
        f"(T'={args.edit_t_prime}, {args.edit_steps} steps)"
    )
    return path


# -- truncated training -----------------------------------------------------------------------------


def truncated_training(args: argparse.Namespace, overrides: list[str]) -> list[dict]:
    """Same steps, same seed: train on all t vs on t <= T'; the held-out loss at t <= T' over steps."""
    import torch
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from torch.utils.data import DataLoader

    from fastsample.diffusion.discrete import DiscreteSchedule
    from fastsample.diffusion.losses import ddpm_loss, edm_loss
    from fastsample.lit.diffusion import DiffusionModule
    from fastsample.utils.instantiation import instantiate
    from fastsample.utils.io import write_bytes_atomic

    out = Path(args.out)
    t_prime = args.train_t_prime
    sigma_t = float(DiscreteSchedule().sigmas[t_prime - 1])
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose(
            "train",
            overrides=[f"dataset={args.train_dataset}", f"net@task.net={args.train_net}", *overrides],
        )
    datamodule = instantiate(cfg.dataset)
    train_set, test_set = datamodule.dataset("train"), datamodule.dataset("test")
    held_out = torch.stack([test_set[i][0] for i in range(min(512, len(test_set)))])
    evaluate_every = max(args.train_steps // 16, 1)

    def held_out_loss(module: DiffusionModule, objective: str) -> float:
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(12345)  # the same noise and levels at every evaluation and for both runs
            denoiser = module.denoiser(ema=False)
            if objective == "edm":
                return float(edm_loss(denoiser, held_out, sigma_upper=sigma_t))
            return float(ddpm_loss(denoiser, held_out, max_timestep=t_prime))

    rows: list[dict] = []
    curves: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for objective in ("edm", "ddpm"):
        for limit in (None, t_prime):
            torch.manual_seed(0)
            module = DiffusionModule(cfg.task.net, objective=objective, max_timestep=limit, lr=2e-3)
            optimizer = torch.optim.Adam(module.net.parameters(), lr=2e-3)
            loader = DataLoader(
                train_set, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0)
            )
            label = "all t" if limit is None else f"t <= {t_prime}"
            curve = curves.setdefault((objective, label), [(0, held_out_loss(module, objective))])
            step, begin = 0, time.process_time()
            while step < args.train_steps:
                for images, labels in loader:
                    loss = module.loss((images, labels))
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    step += 1
                    if step % evaluate_every == 0 or step == args.train_steps:
                        curve.append((step, held_out_loss(module, objective)))
                    if step >= args.train_steps:
                        break
            cpu = time.process_time() - begin
            print(
                f"  {objective} {label:>9}: loss at t <= {t_prime} {curve[-1][1]:.4f} after {step} steps "
                f"({cpu:.0f} CPU s)",
                flush=True,
            )
    lines = [
        f"Truncated training ({args.train_dataset}, {args.train_net}, batch 64, Adam 2e-3, "
        f"{args.train_steps} steps): "
        f"held-out loss at t <= T' = {t_prime} (sigma <= {sigma_t:.3g}), fixed noise",
        "",
        "| objective | trained on | loss at step "
        + " | ".join(str(s) for s, _ in curves[("edm", "all t")][1::4])
        + " | final | steps to reach the full run's final loss |",
        "|---|---|" + "---:|" * (len(curves[("edm", "all t")][1::4]) + 2),
    ]
    for objective in ("edm", "ddpm"):
        target = curves[(objective, "all t")][-1][1]
        for label in ("all t", f"t <= {t_prime}"):
            curve = curves[(objective, label)]
            reached = next((step for step, value in curve if step and value <= target), None)
            rows.append(
                {
                    "objective": objective,
                    "trained_on": label,
                    "final": curve[-1][1],
                    "steps_to_full_final": reached,
                }
            )
            lines.append(
                f"| {objective} | {label} | "
                + " | ".join(f"{v:.4f}" for _, v in curve[1::4])
                + f" | {curve[-1][1]:.4f} | "
                f"{reached if reached is not None else '> ' + str(args.train_steps)} |"
            )
    text = "\n".join(lines)
    write_bytes_atomic(out / "truncated_training.md", (text + "\n").encode())
    print(f"\n{text}\n\nwritten to {out / 'truncated_training.md'}")
    return rows


def main() -> None:
    args, overrides = parse_args()
    if args.mode == "control":
        run_cli(lambda: control_grid(args, overrides))
    elif args.mode == "pairs":
        run_cli(lambda: prior_pairs(args, overrides))
    elif args.mode == "truncated-training":
        run_cli(lambda: truncated_training(args, overrides))
    else:
        run_cli(lambda: es_ddpm_fid(args, overrides))


if __name__ == "__main__":
    main()
