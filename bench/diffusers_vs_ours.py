"""fastsample's samplers beside diffusers' schedulers on the shipped Fashion-MNIST model.

Two measurements (docs/diffusers.md has a run):

1. FID vs NFE: every sampler at each step count on the same seeds (class labels cycling), scored on
   the fly with the shipped classifier's features against the Fashion-MNIST test split, through
   fastsample/jobs/benchmark.py's engine (the rows are what ``evaluate.py mode=generate`` reports).
   diffusers' schedulers run with ``sampler=diffusers`` on the same denoiser: diffusers' default
   linear table (T = 1000) and their default settings, starting at ``noise * init_noise_sigma``.
2. Sampler overhead: CPU time per step of each sampler with a denoiser that costs nothing
   (``D = 0``), i.e. what the solver itself adds per step, at the benchmark's batch size (CPU time,
   so other jobs on the machine do not count; run it with one thread).

    python bench/diffusers_vs_ours.py                      # 200 seeds, 4 / 8 / 16 steps
    python bench/diffusers_vs_ours.py --seeds 1000 --steps 5,10,20 --device cuda
    python bench/diffusers_vs_ours.py --overhead-only      # the overhead table alone (a minute)

Needs ``pip install fastsample[diffusers]``. Writes ``fid_vs_nfe.{md,csv,png}`` and
``overhead.md`` to ``--out`` and prints both tables.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastsample.diffusion import FunctionDenoiser  # noqa: E402
from fastsample.jobs.benchmark import compose, markdown_table, plot, sampler_row, write_csv  # noqa: E402
from fastsample.jobs.evaluation import build_evaluator, prepare_reference  # noqa: E402
from fastsample.jobs.setup import build_model, data_shape  # noqa: E402
from fastsample.samplers.diffusers_scheduler import DiffusersSampler  # noqa: E402
from fastsample.utils.device import resolve_device  # noqa: E402
from fastsample.utils.errors import run_cli  # noqa: E402
from fastsample.utils.instantiation import instantiate  # noqa: E402
from fastsample.utils.io import write_bytes_atomic  # noqa: E402
from fastsample.utils.seeding import SeedNoise, labels_for  # noqa: E402

#: (row label, sampler overrides): fastsample's samplers with their shipped configs, then diffusers'
SAMPLERS = {
    "ours: ddim": ["sampler=ddim"],
    "ours: euler": ["sampler=euler"],
    "ours: dpmpp_2m": ["sampler=dpmpp_2m"],
    "ours: unipc": ["sampler=unipc"],
    "diffusers: DDIM": ["sampler=diffusers", "sampler.scheduler=DDIMScheduler"],
    "diffusers: Euler": ["sampler=diffusers", "sampler.scheduler=EulerDiscreteScheduler"],
    "diffusers: DPM++2M": ["sampler=diffusers", "sampler.scheduler=DPMSolverMultistepScheduler"],
    "diffusers: DPM++2M Karras": [
        "sampler=diffusers",
        "sampler.scheduler=DPMSolverMultistepScheduler",
        "+sampler.scheduler_config.use_karras_sigmas=true",
    ],
    "diffusers: UniPC": ["sampler=diffusers", "sampler.scheduler=UniPCMultistepScheduler"],
}


def base_overrides(args: argparse.Namespace) -> list[str]:
    return [
        "model=unet_fmnist",
        "features=classifier",
        "split=test",
        f"device={args.device}",
        f"batch_size={args.batch_size}",
        f"seeds={args.seeds}",
        f"paths.output_dir={args.out}",
        "evaluator.scores=[fid,kid]",
        "evaluator.kid_subsets=50",
        "class_labels=cycle",
        "progress=false",
    ]


def build_sampler(base: list[str], overrides: list[str], steps: int):
    return instantiate(compose([*base, *overrides, f"sampler.steps={steps}"]).sampler)


def fid_rows(args: argparse.Namespace, steps_list: list[int]) -> list[dict]:
    """Score every (sampler, steps) pair on the same seeds."""
    base = base_overrides(args)
    cfg = compose(base)
    device = resolve_device(cfg.device)
    evaluator = build_evaluator(cfg, device)
    evaluator.reference = prepare_reference(cfg, evaluator)
    model = build_model(cfg, device)
    shape = data_shape(cfg, model)
    seeds = list(range(args.seeds))
    labels = labels_for(seeds, "cycle", model.num_classes)
    warm = build_sampler(base, ["sampler=euler"], 1)  # first-call costs must not land on a row
    evaluator.score_sampler(model, warm, seeds[:4], shape=shape, class_labels=labels[:4], device=device)
    rows = []
    for label, overrides in SAMPLERS.items():
        for steps in steps_list:
            sampler = build_sampler(base, overrides, steps)
            scores = evaluator.score_sampler(
                model, sampler, seeds, args.batch_size, shape=shape, class_labels=labels, device=device
            )
            rows.append(sampler_row(label, steps, sampler.nfe, scores, len(seeds)))
            print(f"  {label:>26} steps {steps:>3} NFE {sampler.nfe:>3}: FID {scores['fid']:.4g}", flush=True)
    return rows


def free_denoiser(shape: tuple[int, ...], num_classes: int) -> FunctionDenoiser:
    """``D = 0`` with the shipped model's shape, range and classes: only the solver costs time."""
    denoiser = FunctionDenoiser(lambda x, sigma, **_: torch.zeros_like(x), image_shape=shape)
    denoiser.num_classes = num_classes
    return denoiser


def median_cpu(call, repeats: int) -> float:
    """Median CPU time of ``call()``: with one thread it is the work done, whatever else the cores run."""
    times = []
    for _ in range(repeats):
        start = time.process_time()
        call()
        times.append(time.process_time() - start)
    return statistics.median(times)


def setup_call(sampler, model):
    """What a run does once before its steps: build the sigma grid, or the diffusers scheduler."""
    if isinstance(sampler, DiffusersSampler):
        return lambda: sampler.scheduler(model)
    return lambda: sampler.sigmas(model)


def overhead_rows(args: argparse.Namespace, steps: int, repeats: int = 7) -> list[dict]:
    """CPU time per step and per run (setup) of each sampler around a free denoiser (``--batch-size``)."""
    base = base_overrides(args)
    model = free_denoiser((1, 28, 28), 10)
    seeds = list(range(args.batch_size))
    cond = {"class_labels": torch.tensor([seed % 10 for seed in seeds])}
    noise = SeedNoise(seeds).randn(model.image_shape)
    rows = []
    for label, overrides in SAMPLERS.items():
        sampler = build_sampler(base, overrides, steps)

        def run(sampler=sampler) -> None:
            with torch.no_grad():
                sampler.sample(model, noise, cond=cond, generator=SeedNoise(seeds))

        run()  # warm-up
        setup = median_cpu(setup_call(sampler, model), repeats)
        per_step = (median_cpu(run, repeats) - setup) / steps
        rows.append({"sampler": label, "step_ms": 1000 * per_step, "setup_ms": 1000 * setup})
        print(f"  {label:>26}: {1000 * per_step:.3f} ms / step, setup {1000 * setup:.2f} ms", flush=True)
    return rows


def overhead_table(rows: list[dict], steps: int, batch: int) -> str:
    lines = [
        f"batch {batch}, denoiser D = 0 (no network), {steps} steps, {torch.get_num_threads()} thread(s), "
        "CPU time (median of 7 runs)",
        "",
        "| sampler | per step (ms) | setup per run (ms) |",
        "|---|---:|---:|",
    ]
    lines += [f"| {row['sampler']} | {row['step_ms']:.3f} | {row['setup_ms']:.2f} |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=200, help="samples per (sampler, steps)")
    parser.add_argument("--steps", default="4,8,16", help="comma-separated step counts")
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="outputs/bench/diffusers_vs_ours")
    parser.add_argument("--overhead-steps", type=int, default=10)
    parser.add_argument("--overhead-only", action="store_true", help="skip the FID table")
    args = parser.parse_args()
    out = Path(args.out)
    steps_list = [int(n) for n in args.steps.split(",")]
    start = time.perf_counter()
    overhead = overhead_table(overhead_rows(args, args.overhead_steps), args.overhead_steps, args.batch_size)
    write_bytes_atomic(out / "overhead.md", f"{overhead}\n".encode())
    if args.overhead_only:
        print(f"\n{overhead}")
        return
    rows = run_cli(lambda: fid_rows(args, steps_list))
    title = f"unet_fmnist, {args.seeds} samples, class labels cycling, classifier features"
    write_csv(out / "fid_vs_nfe.csv", rows)
    write_bytes_atomic(out / "fid_vs_nfe.md", f"{title}\n\n{markdown_table(rows)}\n".encode())
    plot(out / "fid_vs_nfe.png", rows, title)
    print(f"\n{title}\n\n{markdown_table(rows)}\n\n{overhead}")
    print(f"\nwritten to {out} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
