"""FID vs NFE and vs wall time: one model, several samplers x step counts, the same seeds for all.

The engine is fastsample/jobs/benchmark.py (``make bench-fid`` runs it on the shipped model).
Builds everything through conf/evaluate.yaml and the evaluate job's functions (model, extractor,
reference statistics cached in paths.cache_dir, per-seed sampling), so a row is what
``python evaluate.py mode=generate sampler=<s> sampler.steps=<n> seeds=0-<N-1>`` reports. The
default is the analytic Gaussian mixture fitted to Fashion-MNIST with the domain classifier's
features; for a mixture, exact samples give the FID floor of the sample size (row ``exact``).

    python bench/fid_vs_nfe.py                                   # GMM, 6 samplers x 3 step counts, 500
    python bench/fid_vs_nfe.py --samplers euler,heun --steps 4,8,16,32 --num-samples 2000
    python bench/fid_vs_nfe.py --model from_checkpoint model.path=outputs/train/.../model.pt
    python bench/fid_vs_nfe.py features.path=/path/classifier.pt  # any evaluate.yaml override
    python bench/fid_vs_nfe.py --samplers dpmpp_2m,dpmpp_2m@loglinear,dpmpp_2m@file:DIR/s-nfe{steps}.yaml
                                # schedules: sampler@<schedule kind> or sampler@file:<path with {steps}>

    python bench/fid_vs_nfe.py --merge runA/fid_vs_nfe.csv runB/fid_vs_nfe.csv --out merged  # no sampling

Writes ``fid_vs_nfe.csv`` and ``fid_vs_nfe.png`` to ``--out`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastsample.jobs.benchmark import BenchSettings, fid_vs_nfe, merge_runs  # noqa: E402
from fastsample.utils.errors import run_cli  # noqa: E402

DEFAULTS = BenchSettings()


def parse_args(argv: list[str] | None = None) -> tuple[BenchSettings, list[str], argparse.Namespace]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--samplers",
        default=",".join(DEFAULTS.samplers),
        help="comma-separated conf/sampler names, each optionally @<schedule kind> or @file:<path, {steps}>",
    )
    parser.add_argument(
        "--steps", default=",".join(map(str, DEFAULTS.steps)), help="comma-separated step counts"
    )
    parser.add_argument(
        "--num-samples", type=int, default=DEFAULTS.num_samples, help="samples per (sampler, steps)"
    )
    parser.add_argument("--model", default=DEFAULTS.model, help="conf/model config")
    parser.add_argument(
        "--dataset", default=None, help="conf/dataset config of the reference (default: evaluate.yaml's)"
    )
    parser.add_argument(
        "--metrics", default=DEFAULTS.metrics, help="conf/features config (feature extractor)"
    )
    parser.add_argument("--split", default=DEFAULTS.split, help="reference split (test: 10k images, quick)")
    parser.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    parser.add_argument("--device", default=DEFAULTS.device)
    parser.add_argument("--out", default=DEFAULTS.out, help="output folder")
    parser.add_argument("--no-exact", action="store_true", help="skip the exact-samples row of a mixture")
    parser.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="CSV",
        help="no sampling: earlier runs' fid_vs_nfe.csv rows (same seeds) as one table + plot in --out",
    )
    parser.add_argument("--title", default=None, help="plot title of --merge")
    args, overrides = parser.parse_known_args(argv)
    settings = BenchSettings(
        samplers=tuple(name for name in args.samplers.split(",") if name),
        steps=tuple(int(n) for n in args.steps.split(",") if n),
        num_samples=args.num_samples,
        model=args.model,
        dataset=args.dataset,
        metrics=args.metrics,
        split=args.split,
        batch_size=args.batch_size,
        device=args.device,
        out=args.out,
        exact=not args.no_exact,
    )
    return settings, overrides, args


def main() -> None:
    settings, overrides, args = parse_args()
    if args.merge:
        title = args.title or f"{settings.model} (merged runs)"
        run_cli(lambda: merge_runs(args.merge, Path(settings.out), title))
        return
    unknown = [item for item in overrides if item.startswith("--")]
    if unknown:
        sys.exit(f"error: unknown option(s) {' '.join(unknown)}; Hydra overrides are written key=value")
    run_cli(lambda: fid_vs_nfe(settings, overrides))


if __name__ == "__main__":
    main()
