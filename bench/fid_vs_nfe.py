"""FID vs NFE and vs wall time: one model, several samplers x step counts, the same seeds for all.

Builds everything through conf/evaluate.yaml and the evaluate job's functions (model, extractor,
reference statistics cached in paths.cache_dir, per-seed sampling), so a row is what
``python evaluate.py mode=generate sampler=<s> sampler.steps=<n> seeds=0-<N-1>`` reports. The
default is the analytic Gaussian mixture fitted to Fashion-MNIST with the domain classifier's
features; for a mixture, exact samples give the FID floor of the sample size (row ``exact``).

    python bench/fid_vs_nfe.py                                   # GMM, 6 samplers x 3 step counts, 500
    python bench/fid_vs_nfe.py --samplers euler,heun --steps 4,8,16,32 --num-samples 2000
    python bench/fid_vs_nfe.py --model from_checkpoint model.path=outputs/train/.../model.pt
    python bench/fid_vs_nfe.py metrics.path=/path/classifier.pt  # any evaluate.yaml override

Writes ``fid_vs_nfe.csv`` and ``fid_vs_nfe.png`` to ``--out`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastsample.evaluation import build_evaluator, prepare_reference  # noqa: E402
from fastsample.sampling import build_guidance, build_model, data_shape, labels_for, resolve_device  # noqa: E402
from fastsample.utils.errors import run_cli  # noqa: E402
from fastsample.utils.instantiation import instantiate  # noqa: E402
from fastsample.utils.io import write_bytes_atomic  # noqa: E402

DEFAULT_SAMPLERS = "euler,heun,dpmpp_2m,dpmpp_3m,ipndm,unipc"
COLUMNS = ["sampler", "steps", "nfe", "fid", "kid", "sampling_s", "ms_per_image"]


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samplers", default=DEFAULT_SAMPLERS, help="comma-separated conf/sampler names")
    parser.add_argument("--steps", default="5,10,20", help="comma-separated step counts")
    parser.add_argument("--num-samples", type=int, default=500, help="samples per (sampler, steps)")
    parser.add_argument("--model", default="gmm_fmnist", help="conf/model config")
    parser.add_argument(
        "--dataset",
        default=None,
        help="conf/dataset config of the reference (default: the evaluate.yaml default, fashion_mnist)",
    )
    parser.add_argument("--metrics", default="classifier", help="conf/metrics config (feature extractor)")
    parser.add_argument("--split", default="test", help="reference split (test: 10k images, quick to build)")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="outputs/bench/fid_vs_nfe", help="output folder")
    parser.add_argument("--no-exact", action="store_true", help="skip the exact-samples row of a mixture")
    return parser.parse_known_args(argv)


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

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
        "sampling_s": None,
        "ms_per_image": None,
    }


def run(args: argparse.Namespace, overrides: list[str]) -> list[dict]:
    out = Path(args.out)
    samplers = [name for name in args.samplers.split(",") if name]
    steps_list = [int(n) for n in args.steps.split(",") if n]
    seeds = list(range(args.num_samples))
    base = [
        f"model={args.model}",
        f"metrics={args.metrics}",
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
    base += overrides
    cfg = compose(base)
    device = resolve_device(cfg.device)
    start = time.perf_counter()
    evaluator = build_evaluator(cfg, device)
    evaluator.reference = prepare_reference(cfg, evaluator)
    print(f"reference: {evaluator.reference.describe()} ({time.perf_counter() - start:.1f} s)", flush=True)
    model = build_model(cfg, device)
    shape = data_shape(cfg, model)
    labels = labels_for(seeds, cfg.get("class_labels"), getattr(model, "num_classes", None))
    guidance = build_guidance(cfg)
    identity = model.identity() if hasattr(model, "identity") else type(model).__name__
    print(
        f"model: {identity}; extractor {evaluator.extractor.name}; {len(seeds)} samples on {device}",
        flush=True,
    )

    rows = []
    if not args.no_exact and (row := exact_row(model, evaluator, seeds, args.batch_size)) is not None:
        rows.append(row)
    # Warm-up (first-call overheads must not land on the first sampler's time).
    warm = instantiate(compose([*base, "sampler=euler", "sampler.steps=1"]).sampler)
    evaluator.score_sampler(model, warm, seeds[:4], shape=shape, device=device)
    for name in samplers:
        for steps in steps_list:
            sampler = instantiate(compose([*base, f"sampler={name}", f"sampler.steps={steps}"]).sampler)
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
                    "sampler": name,
                    "steps": steps,
                    "nfe": sampler.nfe,
                    "fid": scores["fid"],
                    "kid": scores.get("kid_mean"),
                    "sampling_s": scores["sampling_s"],
                    "ms_per_image": 1000 * scores["sampling_s"] / len(seeds),
                }
            )
            print(
                f"  {name:>12} steps {steps:>3} NFE {sampler.nfe:>3}: FID {scores['fid']:.4g} "
                f"({scores['sampling_s']:.2f} s)",
                flush=True,
            )
    write_csv(out / "fid_vs_nfe.csv", rows)
    plot(out / "fid_vs_nfe.png", rows, f"{args.model}, {len(seeds)} samples, {evaluator.extractor.name}")
    print()
    print(markdown_table(rows))
    print(f"\nCSV: {out / 'fid_vs_nfe.csv'}\nplot: {out / 'fid_vs_nfe.png'}")
    return rows


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


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| sampler | steps | NFE | FID | KID | sampling s | ms / image |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['sampler']} | {row['steps']} | {row['nfe']} | {fmt(row['fid'])} | "
            f"{fmt(row['kid'], 3)} | {fmt(row['sampling_s'], 3)} | {fmt(row['ms_per_image'], 3)} |"
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


def main() -> None:
    args, overrides = parse_args()
    unknown = [item for item in overrides if item.startswith("--")]
    if unknown:
        sys.exit(f"error: unknown option(s) {' '.join(unknown)}; Hydra overrides are written key=value")
    run_cli(lambda: run(args, overrides))


if __name__ == "__main__":
    main()
