"""FID vs NFE and vs wall time: one model, several samplers x step counts, the same seeds for all.

The engine of ``bench/fid_vs_nfe.py`` (``make bench-fid``); ``make demo`` uses its pieces. Everything
is built through conf/evaluate.yaml and the evaluate job's functions (model, extractor, reference
statistics cached in ``paths.cache_dir``, per-seed sampling), so a row is what ``python evaluate.py
mode=generate sampler=<s> sampler.steps=<n> seeds=0-<N-1>`` reports. For an analytic mixture, exact
samples give the FID floor of the sample size (row ``exact``); for class-conditional runs
(``class_labels=cycle``) the rows also hold how often the domain classifier agrees with the requested label.
"""

from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir

from fastsample.jobs.evaluation import build_evaluator, prepare_reference
from fastsample.jobs.setup import plan, resolve_device
from fastsample.lit.tracking import log_summary
from fastsample.utils.errors import fail
from fastsample.utils.instantiation import instantiate
from fastsample.utils.io import write_bytes_atomic

ROOT = Path(__file__).resolve().parents[2]  # the repository: conf/ lives there
COLUMNS = ["sampler", "steps", "nfe", "fid", "kid", "class_accuracy", "sampling_s", "ms_per_image"]


@dataclass
class BenchSettings:
    """What :func:`fid_vs_nfe` runs: samplers x step counts on one model, ``num_samples`` seeds each."""

    samplers: tuple[str, ...] = ("euler", "heun", "dpmpp_2m", "dpmpp_3m", "ipndm", "unipc")
    steps: tuple[int, ...] = (5, 10, 20)
    num_samples: int = 500
    model: str = "gmm_fmnist"
    dataset: str | None = None
    metrics: str = "classifier"
    split: str = "test"
    batch_size: int = 250
    device: str = "auto"
    out: str = "outputs/bench/fid_vs_nfe"
    exact: bool = True


def compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose("evaluate", overrides=overrides)


def exact_row(model, evaluator, seeds: list[int], batch_size: int) -> dict | None:
    """FID of exact samples of an analytic mixture (the floor for this sample size), else None."""
    if not hasattr(model, "sample") or not hasattr(model, "log_prob"):
        return None
    generator = torch.Generator().manual_seed(seeds[0])

    def batches():
        for start in range(0, len(seeds), batch_size):
            images, _ = model.sample(min(batch_size, len(seeds) - start), generator=generator)
            yield images.float().cpu()

    scores = evaluator.score_images(batches(), what="exact mixture samples")
    return {
        "sampler": "exact",
        "steps": 0,
        "nfe": 0,
        "fid": scores["fid"],
        "kid": scores.get("kid_mean"),
        "class_accuracy": None,
        "sampling_s": None,
        "ms_per_image": None,
    }


def fid_vs_nfe(args: BenchSettings, overrides: list[str] = ()) -> list[dict]:
    """Score every (sampler, steps) pair on the same seeds; write CSV + plot; print a markdown table."""
    out = Path(args.out)
    samplers, steps_list = list(args.samplers), [int(n) for n in args.steps]
    seeds = list(range(args.num_samples))
    base = [
        f"model={args.model}",
        f"features={args.metrics}",
        f"split={args.split}",
        f"device={args.device}",
        f"batch_size={args.batch_size}",
        f"seeds={args.num_samples}",
        f"paths.output_dir={out}",
        "evaluator.scores=[fid,kid]",
        "evaluator.kid_subsets=50",
    ]
    if args.dataset:
        base.append(f"dataset={args.dataset}")
    base += list(overrides)
    cfg = compose(base)
    device = resolve_device(cfg.device)
    start = time.perf_counter()
    evaluator = build_evaluator(cfg, device)
    evaluator.reference = prepare_reference(cfg, evaluator)
    print(f"reference: {evaluator.reference.describe()} ({time.perf_counter() - start:.1f} s)", flush=True)
    setup = plan(cfg, device=device)
    print(
        f"model: {setup.describe()['model']}; extractor {evaluator.extractor.name}; "
        f"{len(seeds)} samples on {device}",
        flush=True,
    )

    rows = []
    if args.exact and (row := exact_row(setup.model, evaluator, seeds, args.batch_size)) is not None:
        rows.append(row)
    # Warm-up (first-call overheads must not land on the first sampler's time).
    warm = instantiate(compose([*base, "sampler=euler", "sampler.steps=1"]).sampler)
    with torch.no_grad():  # generate + features without scoring: 4 samples would warn about their FID
        evaluator.extractor(replace(setup, sampler=warm).generate(seeds[:4]))
    for spec in samplers:
        for steps in steps_list:
            name, sampler_overrides = parse_sampler_spec(spec, steps)
            sampler = instantiate(compose([*base, *sampler_overrides]).sampler)
            scores = replace(setup, sampler=sampler).score(evaluator)
            rows.append(sampler_row(name, steps, sampler.nfe, scores, len(seeds)))
            print(
                f"  {name:>12} steps {steps:>3} NFE {sampler.nfe:>3}: FID {scores['fid']:.4g} "
                f"({scores['sampling_s']:.2f} s)",
                flush=True,
            )
    title = f"{args.model}, {len(seeds)} samples, {evaluator.extractor.name}"
    write_report(out, rows, title)
    log_summary(  # logger=wandb|tensorboard: the table and the plot as a run of their own
        cfg.get("logger"),
        rows,
        f"{title}\n\n{markdown_table(rows)}",
        key="benchmark/fid_vs_nfe",
        plots={"benchmark/fid_vs_nfe": out / "fid_vs_nfe.png"},
    )
    print(f"\n{markdown_table(rows)}")
    print(f"\ntable: {out / 'fid_vs_nfe.md'}\nCSV: {out / 'fid_vs_nfe.csv'}\nplot: {out / 'fid_vs_nfe.png'}")
    return rows


def parse_sampler_spec(spec: str, steps: int) -> tuple[str, list[str]]:
    """A row label and the config overrides of ``spec`` at ``steps`` steps.

    ``spec`` is a conf/sampler name, optionally with a schedule: ``dpmpp_2m@loglinear`` (any
    ``sampler.schedule.kind``) or ``dpmpp_2m@file:schedules/dpmpp_2m-nfe{steps}.yaml`` (a schedule file
    per step count; ``{steps}`` is filled in), so searched schedules sit beside the hand-designed ones.
    """
    name, _, schedule = spec.partition("@")
    overrides = [f"sampler={name}", f"sampler.steps={steps}"]
    if schedule.startswith("file:"):
        path = schedule.removeprefix("file:").format(steps=steps)
        overrides += ["sampler.schedule.kind=file", f"++sampler.schedule.path={path}"]
        return f"{name}@{Path(schedule).stem.split('-')[-1]}", overrides
    if schedule:
        overrides.append(f"sampler.schedule.kind={schedule}")
    return spec, overrides


def sampler_row(name: str, steps: int, nfe: int, scores: dict, count: int) -> dict:
    """One table row from :meth:`Evaluator.score_sampler`'s scores."""
    return {
        "sampler": name,
        "steps": steps,
        "nfe": nfe,
        "fid": scores["fid"],
        "kid": scores.get("kid_mean"),
        "class_accuracy": scores.get("class_accuracy"),
        "sampling_s": scores["sampling_s"],
        "ms_per_image": 1000 * scores["sampling_s"] / count,
    }


def fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def write_csv(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if row[key] is None else row[key] for key in COLUMNS})
    write_bytes_atomic(path, buffer.getvalue().encode())


def write_report(out: Path, rows: list[dict], title: str) -> None:
    """``fid_vs_nfe.csv``, ``.md`` (title + table) and ``.png`` of ``rows`` in ``out``."""
    write_csv(out / "fid_vs_nfe.csv", rows)
    write_bytes_atomic(out / "fid_vs_nfe.md", f"{title}\n\n{markdown_table(rows)}\n".encode())
    plot(out / "fid_vs_nfe.png", rows, title)


def read_csv(path: Path) -> list[dict]:
    """Rows of a benchmark CSV (this module's or a sibling bench's), numbers parsed, empty cells None."""
    integers, floats = ("steps", "nfe"), ("fid", "kid", "class_accuracy", "sampling_s", "ms_per_image")
    with Path(path).open() as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        for key in integers + floats:
            if key in row:
                row[key] = (int if key in integers else float)(row[key]) if row[key] else None
    return rows


def merge_runs(paths: list[str], out: Path, title: str) -> list[dict]:
    """The rows of several runs' ``fid_vs_nfe.csv`` (the same seeds and features) as one table and plot."""
    rows: list[dict] = []
    for path in map(Path, paths):
        if not path.is_file():
            fail(f"--merge: {path} does not exist (a fid_vs_nfe.csv of an earlier run)")
        rows += read_csv(path)
    write_report(out, rows, title)
    print(f"{markdown_table(rows)}\n\nCSV: {out / 'fid_vs_nfe.csv'}\nplot: {out / 'fid_vs_nfe.png'}")
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| sampler | steps | NFE | FID | KID | class acc. | sampling s | ms / image |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['sampler']} | {row['steps']} | {row['nfe']} | {fmt(row['fid'])} | "
            f"{fmt(row['kid'], 3)} | {fmt(row['class_accuracy'], 3)} | {fmt(row['sampling_s'], 3)} | "
            f"{fmt(row['ms_per_image'], 3)} |"
        )
    return "\n".join(lines)


def plot(path: Path, rows: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    figure, (by_nfe, by_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in dict.fromkeys(row["sampler"] for row in rows if row["sampler"] != "exact"):
        mine = sorted((row for row in rows if row["sampler"] == name), key=lambda row: row["nfe"])
        fids = [row["fid"] for row in mine]
        by_nfe.plot([row["nfe"] for row in mine], fids, marker="o", label=name)
        by_time.plot([row["sampling_s"] for row in mine], fids, marker="o", label=name)
    for row in rows:
        if row["sampler"] == "exact":
            for axis in (by_nfe, by_time):
                axis.axhline(row["fid"], color="black", linestyle="--", linewidth=1, label="exact samples")
    for axis, label in ((by_nfe, "NFE"), (by_time, "sampling wall time (s)")):
        axis.set_xscale("log")
        axis.set_yscale("log")
        for scale in (axis.xaxis, axis.yaxis):  # plain numbers at 1, 2, 5 x 10^k
            scale.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            scale.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
            scale.set_minor_formatter(NullFormatter())
        axis.set_xlabel(label)
        axis.set_ylabel("FID (domain features)")
        axis.grid(True, which="both", alpha=0.3)
    by_nfe.legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    write_bytes_atomic(path, buffer.getvalue())
