"""The embedded default (``make demo``): fastsample's best few-step sampler next to the usual ones, at the
same NFE, on the shipped Fashion-MNIST model, in under 2 minutes on 2 CPU cores.

Every row samples the same seeds (class labels cycling through the ten classes) with the shipped
class-conditional diffusion model and is scored on the fly with the shipped classifier's features
against the Fashion-MNIST test split: FID, KID and how often the classifier recognises the requested
class. Rows: Euler (DDIM's update, the default of most pipelines), DPM-Solver++(2M) on the Karras
schedule (fastsample's default sampler) and fastsample's best at that NFE (:func:`best_sampler`: a
tuned sampler file shipped in ``fastsample/assets/tuned/`` once ``sample.py mode=tune`` has made one,
else DPM-Solver++(2M) on the shipped quality schedule). Writes ``demo.{md,csv}``, a 10 x 10 grid per row
(one class per column) and ``comparison.png`` (the grids side by side) to ``outputs/demo/<time>/``.

    python -m fastsample.jobs.demo                       # NFE 5, 1000 seeds
    python -m fastsample.jobs.demo --nfe 10 --seeds 2000 --out DIR
    python -m fastsample.jobs.demo --best 'tuned:PATH'   # any sampler spec (see parse_sampler_spec)

The full benchmark (six samplers x 4 / 8 / 16 steps) is ``make bench-fid`` (``bench/fid_vs_nfe.py``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from fastsample.jobs.benchmark import (
    ROOT,
    compose,
    markdown_table,
    parse_sampler_spec,
    sampler_row,
    write_csv,
)
from fastsample.jobs.evaluation import PreviewGrid, build_evaluator, prepare_reference
from fastsample.jobs.setup import plan, resolve_device
from fastsample.utils.errors import run_cli
from fastsample.utils.images import grid, save_png
from fastsample.utils.instantiation import instantiate
from fastsample.utils.io import write_bytes_atomic
from fastsample.utils.quiet import quiet_third_party

MODEL = "unet_fmnist"
ASSETS = ROOT / "fastsample" / "assets"
#: what a newcomer would pick: (row label, sampler spec); the spec's steps are the demo's NFE
BASELINES = (("euler (DDIM update)", "euler"), ("dpmpp_2m, Karras (our default)", "dpmpp_2m"))
GRID_SEEDS = 100  # the first 100 seeds: a 10 x 10 grid, one class per column


def best_sampler(nfe: int) -> tuple[str, str]:
    """(row label, sampler spec) of fastsample's best sampler at ``nfe`` on the shipped model.

    A tuned sampler file (``sample.py mode=tune``'s ``tuned-nfe<N>.yaml``) placed in
    ``fastsample/assets/tuned/`` wins; otherwise DPM-Solver++(2M) on the shipped quality schedule
    (docs/schedules.md: the best FID at NFE 5 and 10 in 2000 held-out seeds), else on GITS.
    """
    tuned = ASSETS / "tuned" / f"tuned-nfe{nfe}.yaml"
    if tuned.is_file():
        return f"tuned ({tuned.name})", f"tuned:{tuned}"
    for method in ("quality", "gits"):
        schedule = ASSETS / "schedules" / f"schedule-dpmpp_2m-nfe{nfe}-{method}.yaml"
        if schedule.is_file():
            return f"dpmpp_2m, {method} schedule (our best)", f"dpmpp_2m@file:{schedule}"
    return "dpmpp_2m, log-SNR schedule", "dpmpp_2m@loglinear"


def sampler_overrides(spec: str, nfe: int) -> list[str]:
    """Config overrides of a spec: ``tuned:<file>`` (steps from the file) or :func:`parse_sampler_spec`'s."""
    if spec.startswith("tuned:"):
        return ["sampler=tuned", f"sampler.path={spec.removeprefix('tuned:')}"]
    return parse_sampler_spec(spec, nfe)[1]


def stage(number: int, total: int, text: str) -> None:
    """One line per stage, so a user sees what the next bar is for."""
    print(f"[{number}/{total}] {text}", flush=True)


def run_demo(
    nfe: int,
    num_seeds: int,
    out: Path,
    best: tuple[str, str] | None = None,
    overrides: Sequence[str] = (),
) -> list[dict]:
    """Score the baselines and the best sampler at ``nfe`` on seeds 0..num_seeds-1; write the outputs.

    ``overrides``: further conf/evaluate.yaml settings (the tests shrink the reference set with them).
    """
    rows_spec = [*BASELINES, best or best_sampler(nfe)]
    base = [
        f"model={MODEL}",
        "features=classifier",
        "split=test",
        f"seeds={num_seeds}",
        "batch_size=250",
        "class_labels=cycle",
        f"paths.output_dir={out}",
        "evaluator.scores=[fid,kid]",
        "evaluator.kid_subsets=50",
        *overrides,
    ]
    cfg = compose(base)
    device = resolve_device(cfg.device)
    total = len(rows_spec) + 1
    stage(1, total, "reference statistics of the Fashion-MNIST test split (built once, then cached)")
    evaluator = build_evaluator(cfg, device)
    evaluator.reference = prepare_reference(cfg, evaluator)
    setup = plan(cfg, device=device)
    warm = instantiate(compose([*base, "sampler=euler", "sampler.steps=1"]).sampler)
    with torch.no_grad():  # warm-up: first-call costs must not land on the first row's time
        evaluator.extractor(replace(setup, sampler=warm).generate(setup.seeds[:4]))
    rows, grids = [], []
    for number, (label, spec) in enumerate(rows_spec, start=2):
        sampler = instantiate(compose([*base, *sampler_overrides(spec, nfe)]).sampler)
        stage(number, total, f"{label}: {sampler.steps} steps, NFE {sampler.nfe}, {num_seeds} samples")
        preview = PreviewGrid(GRID_SEEDS)
        scores = replace(setup, sampler=sampler).score(evaluator, on_batch=preview)
        rows.append(sampler_row(label, sampler.steps, sampler.nfe, scores, num_seeds))
        grids.append((label, np.concatenate(preview.images)))
    write_outputs(out, rows, grids)
    return rows


def write_outputs(out: Path, rows: list[dict], grids: list[tuple[str, np.ndarray]]) -> list[Path]:
    """``demo.md``, ``demo.csv``, ``grid-<n>.png`` per row and ``comparison.png`` (atomic writes); returns
    the images' paths."""
    write_csv(out / "demo.csv", rows)
    write_bytes_atomic(out / "demo.md", f"{markdown_table(rows)}\n".encode())
    paths = []
    for index, (_, images) in enumerate(grids, start=1):
        paths.append(out / f"grid-{index}.png")
        save_png(grid(images, nrow=10), paths[-1])
    paths.append(out / "comparison.png")
    side_by_side([(label, grid(images, nrow=10)) for label, images in grids], paths[-1])
    return paths


def side_by_side(panels: list[tuple[str, np.ndarray]], path: Path, scale: int = 2) -> None:
    """The grids next to each other, each under its label (grayscale, upscaled ``scale`` x)."""
    height = max(image.shape[0] for _, image in panels) * scale
    width = sum(image.shape[1] * scale for _, image in panels) + 16 * (len(panels) - 1)
    canvas = Image.new("L", (width, height + 24), 255)
    draw, left = ImageDraw.Draw(canvas), 0
    for label, image in panels:
        tile = Image.fromarray(image[..., 0]).resize((image.shape[1] * scale, image.shape[0] * scale), 0)
        canvas.paste(tile, (left, 24))
        draw.text((left + 4, 6), label, fill=0)
        left += tile.width + 16
    save_png(np.asarray(canvas)[..., None], path)


def summary_line(rows: list[dict]) -> str:
    """The point in one line: the best row's FID and class accuracy against each baseline's."""
    *baselines, best = rows
    versus = ", ".join(f"{row['fid']:.3g} with {row['sampler'].split(' (')[0]}" for row in baselines)
    accuracy = ", ".join(f"{row['class_accuracy']:.3f}" for row in baselines)
    return (
        f"At NFE {best['nfe']}: FID {best['fid']:.3g} with {best['sampler']} vs {versus}; "
        f"class accuracy {best['class_accuracy']:.3f} vs {accuracy}."
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nfe", type=int, default=5, help="model calls per sample (every row)")
    parser.add_argument("--seeds", type=int, default=1000, help="samples per row (seeds 0..N-1)")
    parser.add_argument("--out", default=None, help="output folder (default outputs/demo/<time>)")
    parser.add_argument("--best", default=None, help="sampler spec of the last row (default: best_sampler)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run the demo; prints the table, the one-line result, the time and the files written."""
    quiet_third_party()
    logging.basicConfig(level=logging.WARNING)  # our INFO lines are for run logs; the stages print here
    args = parse_args(argv)
    out = Path(args.out or time.strftime("outputs/demo/%Y-%m-%d_%H-%M-%S"))
    wall, cpu = time.perf_counter(), time.process_time()
    best = ("custom sampler", args.best) if args.best else None
    rows = run_cli(lambda: run_demo(args.nfe, args.seeds, out, best))
    print(f"\n{markdown_table(rows)}\n\n{summary_line(rows)}")
    print(f"demo finished in {time.perf_counter() - wall:.0f} s wall, {time.process_time() - cpu:.0f} s CPU")
    files = ", ".join(str(out / name) for name in ("comparison.png", "demo.md", "demo.csv"))
    print(f"files: {files} (+ grid-1..{len(rows)}.png)")


if __name__ == "__main__":
    main(sys.argv[1:])
