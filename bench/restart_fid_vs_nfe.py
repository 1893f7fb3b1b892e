"""Restart versus ODE and SDE samplers: FID against NFE on one model, the same seeds for every row.

Curves (Xu et al. 2023, Fig. 3 / Table 3, at this project's scale):
  heun                  EDM's Heun ODE sampler, NFE = 2 steps - 1
  edm_sde S_churn=<c>   EDM's stochastic sampler (conf/sampler/edm_sde.yaml), one curve per S_churn
  ddpm                  DDPM ancestral sampling (DDIM eta = 1), NFE = steps
  restart (<config>)    conf/sampler/<config>.yaml with K (restarts per interval) swept at fixed
                        main steps, NFE = (2 steps - 1) + sum_i K_i 2 (N_restart_i - 1)

Every row is what ``python evaluate.py mode=generate model=<m> sampler=<s> ... seeds=0-<N-1>``
reports (fastsample.jobs.benchmark's engine: model, domain-classifier features, reference statistics
cached in paths.cache_dir, per-seed noise). The summary tests the paper's claims: the NFE at which
Restart first reaches the best SDE FID (and the ratio to the SDE's NFE there), and whether Restart
beats the ODE's best FID, and from which NFE.

    python bench/restart_fid_vs_nfe.py                                        # shipped unet_fmnist
    python bench/restart_fid_vs_nfe.py --model gmm_fmnist --samples 64 --nfe 21,51 --restart-k 1,4
    python bench/restart_fid_vs_nfe.py --churn 5,10,20,40 --restart restart,restart_cifar10_vp
    python bench/restart_fid_vs_nfe.py --samplers heun,restart device=cuda features.path=clf.pt

Unknown ``key=value`` arguments are Hydra overrides of conf/evaluate.yaml. Writes
``restart_fid_vs_nfe.{csv,md,png}`` to ``--out`` and prints the markdown table and the summary.
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

from fastsample.jobs.benchmark import compose, exact_row, fmt, plot, read_csv  # noqa: E402
from fastsample.utils.errors import fail, run_cli  # noqa: E402

COLUMNS = ["sampler", "family", "setting", "steps", "nfe", "fid", "kid", "sampling_s", "ms_per_image"]
FAMILIES = ("heun", "edm_sde", "ddpm", "restart")
SDE_FAMILIES = ("edm_sde", "ddpm")


@dataclass
class Run:
    """One row to score: the curve it belongs to, a description and its conf/evaluate overrides."""

    curve: str
    family: str
    setting: str
    steps: int
    overrides: list[str] = field(default_factory=list)


def ints(text: str) -> list[int]:
    return [int(item) for item in text.split(",") if item.strip()]


def floats(text: str) -> list[float]:
    return [float(item) for item in text.split(",") if item.strip()]


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="unet_fmnist", help="conf/model config (gmm_fmnist: quick)")
    parser.add_argument("--samples", type=int, default=2000, help="seeds 0..N-1, the same for every row")
    parser.add_argument(
        "--nfe",
        default="21,35,51,75,101,151,251,501",
        help="target NFEs of the heun / edm_sde / ddpm curves (Heun uses steps = (NFE + 1) / 2)",
    )
    parser.add_argument("--nfe-max", type=int, default=520, help="restart rows above this NFE are skipped")
    parser.add_argument(
        "--samplers", default=",".join(FAMILIES), help=f"curves to run, from {', '.join(FAMILIES)}"
    )
    parser.add_argument("--churn", default="10,40,80", help="S_churn values of the edm_sde curves")
    parser.add_argument("--ddpm-schedule", default="karras", help="schedule kind of the ddpm curve")
    parser.add_argument("--restart", default="restart", help="conf/sampler restart configs, comma-separated")
    parser.add_argument("--restart-steps", default="18", help="main step counts of the restart curves")
    parser.add_argument(
        "--restart-k", default="1,2,3,5,10,20,40", help="restarts per interval (every interval gets K)"
    )
    parser.add_argument("--metrics", default="classifier", help="conf/features config (feature extractor)")
    parser.add_argument("--split", default="test", help="reference split (test: 10k images)")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="outputs/bench/restart_fid_vs_nfe", help="output folder")
    parser.add_argument("--no-exact", action="store_true", help="skip the exact-samples row of a mixture")
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="DIR",
        help="combine the CSVs of runs split by --samplers (same seeds and model) into --out; no sampling",
    )
    args, overrides = parser.parse_known_args(argv)
    unknown = [item for item in overrides if item.startswith("--")]
    if unknown:
        parser.error(f"unknown option(s) {' '.join(unknown)}; Hydra overrides are written key=value")
    families = [name for name in args.samplers.split(",") if name]
    for name in families:
        if name not in FAMILIES:
            parser.error(f"--samplers: {name!r} is not one of {', '.join(FAMILIES)}")
    args.families = families
    return args, overrides


def plan_runs(args: argparse.Namespace, base: list[str]) -> list[Run]:
    """Every (curve, setting) to score, restart rows with their NFE checked up front."""
    from fastsample.utils.instantiation import instantiate

    runs: list[Run] = []
    targets = sorted(set(ints(args.nfe)))
    heun_steps = sorted({max(1, round((nfe + 1) / 2)) for nfe in targets})
    if "heun" in args.families:
        runs += [
            Run("heun", "heun", f"steps={n}", n, ["sampler=heun", f"sampler.steps={n}"]) for n in heun_steps
        ]
    if "edm_sde" in args.families:
        for churn in floats(args.churn):
            runs += [
                Run(
                    f"edm_sde S_churn={churn:g}",
                    "edm_sde",
                    f"steps={n} S_churn={churn:g}",
                    n,
                    ["sampler=edm_sde", f"sampler.steps={n}", f"sampler.s_churn={churn}"],
                )
                for n in heun_steps
            ]
    if "ddpm" in args.families:
        runs += [
            Run(
                "ddpm",
                "ddpm",
                f"steps={n} {args.ddpm_schedule}",
                n,
                ["sampler=ddpm", f"sampler.steps={n}", f"sampler.schedule.kind={args.ddpm_schedule}"],
            )
            for n in targets
        ]
    if "restart" in args.families:
        for config in [name for name in args.restart.split(",") if name]:
            # "restart" is conf/sampler/restart.yaml; the paper presets are conf/experiment/<name>.yaml
            preset = ["sampler=restart"] + ([f"experiment={config}"] if config != "restart" else [])
            intervals = len(compose([*base, *preset]).sampler.restart_list or [])
            if intervals == 0:
                fail(f"--restart {config}: sampler.restart_list is empty; a restart curve needs an interval")
            for steps in ints(args.restart_steps):
                for k in ints(args.restart_k):
                    overrides = [*preset, f"sampler.steps={steps}"]
                    overrides += [f"sampler.restart_list.{i}.K={k}" for i in range(intervals)]
                    nfe = instantiate(compose([*base, *overrides]).sampler).nfe
                    if nfe <= args.nfe_max:
                        runs.append(
                            Run(
                                f"restart ({config}, N={steps})",
                                "restart",
                                f"steps={steps} K={k}",
                                steps,
                                overrides,
                            )
                        )
    return runs


def restart_fid_vs_nfe(args: argparse.Namespace, overrides: list[str]) -> list[dict]:
    from fastsample.jobs.evaluation import build_evaluator, prepare_reference
    from fastsample.jobs.setup import build_guidance, build_model, data_shape
    from fastsample.utils.device import resolve_device
    from fastsample.utils.instantiation import instantiate
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
        *overrides,
    ]
    cfg = compose(base)
    runs = plan_runs(args, base)
    device = resolve_device(cfg.device)
    start = time.perf_counter()
    evaluator = build_evaluator(cfg, device)
    evaluator.reference = prepare_reference(cfg, evaluator)
    print(f"reference: {evaluator.reference.describe()} ({time.perf_counter() - start:.1f} s)", flush=True)
    model = build_model(cfg, device)
    shape = data_shape(cfg, model)
    labels = labels_for(seeds, cfg.get("class_labels"), getattr(model, "num_classes", None))
    guidance = build_guidance(cfg)
    print(f"model {args.model}; extractor {evaluator.extractor.name}; {len(seeds)} samples on {device}")
    print(f"{len(runs)} rows: " + ", ".join(dict.fromkeys(run.curve for run in runs)), flush=True)

    rows: list[dict] = []
    if not args.no_exact and (row := exact_row(model, evaluator, seeds, args.batch_size)) is not None:
        rows.append({**row, "family": "exact", "setting": "exact samples of the mixture"})
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
                "sampler": run.curve,
                "family": run.family,
                "setting": run.setting,
                "steps": run.steps,
                "nfe": sampler.nfe,
                "fid": scores["fid"],
                "kid": scores.get("kid_mean"),
                "sampling_s": scores["sampling_s"],
                "ms_per_image": 1000 * scores["sampling_s"] / len(seeds),
            }
        )
        print(
            f"  {run.curve:>28} {run.setting:>22} NFE {sampler.nfe:>4}: FID {scores['fid']:.4g} "
            f"({scores['sampling_s']:.1f} s)",
            flush=True,
        )

    title = f"{args.model}, {len(seeds)} samples (seeds 0-{len(seeds) - 1}), {evaluator.extractor.name}"
    return report(out, rows, title)


def report(out: Path, rows: list[dict], title: str) -> list[dict]:
    """Write ``restart_fid_vs_nfe.{csv,md,png}`` to ``out`` and print the table and the summary."""
    from fastsample.utils.io import write_bytes_atomic

    table, summary = markdown_table(rows), summarize(rows)
    write_csv(out / "restart_fid_vs_nfe.csv", rows)
    write_bytes_atomic(out / "restart_fid_vs_nfe.md", f"{title}\n\n{table}\n\n{summary}\n".encode())
    plot(out / "restart_fid_vs_nfe.png", rows, title)
    print(f"\n{table}\n\n{summary}")
    print(f"\nCSV: {out / 'restart_fid_vs_nfe.csv'}\nplot: {out / 'restart_fid_vs_nfe.png'}")
    return rows


def merge(args: argparse.Namespace) -> list[dict]:
    """Rows of several runs (one per curve, e.g. on one GPU side by side) as one table and plot."""
    rows: list[dict] = []
    for folder in args.merge:
        path = Path(folder) / "restart_fid_vs_nfe.csv"
        if not path.is_file():
            fail(f"--merge: {path} does not exist (run the bench with --out {folder} first)")
        rows += read_csv(path)
    return report(Path(args.out), rows, f"{args.model}, {args.samples} samples (merged runs)")


def write_csv(path: Path, rows: list[dict]) -> None:
    from fastsample.utils.io import write_bytes_atomic

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if row.get(key) is None else row[key] for key in COLUMNS})
    write_bytes_atomic(path, buffer.getvalue().encode())


def markdown_table(rows: list[dict]) -> str:
    lines = ["| curve | setting | NFE | FID | KID | sampling s |", "|---|---|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(
            f"| {row['sampler']} | {row['setting']} | {row['nfe']} | {fmt(row['fid'])} | "
            f"{fmt(row['kid'], 3)} | {fmt(row['sampling_s'], 3)} |"
        )
    return "\n".join(lines)


def summarize(rows: list[dict]) -> str:
    """The paper's two claims, measured: Restart vs the best SDE FID, and vs the best ODE FID."""
    scored = [row for row in rows if row.get("fid") is not None and not math.isnan(row["fid"])]
    by_family = {name: [row for row in scored if row.get("family") == name] for name in FAMILIES}
    restart, ode = by_family["restart"], by_family["heun"]
    sde = by_family["edm_sde"] + by_family["ddpm"]
    lines = ["Summary:"]
    for name, members in (("ODE (heun)", ode), ("SDE (edm_sde, ddpm)", sde), ("Restart", restart)):
        if members:
            best = min(members, key=lambda row: row["fid"])
            lines.append(
                f"- best {name}: FID {best['fid']:.4g} at NFE {best['nfe']} "
                f"({best['sampler']}, {best['setting']})"
            )
    if restart and sde:
        best_sde = min(sde, key=lambda row: row["fid"])
        reaching = [row for row in restart if row["fid"] <= best_sde["fid"]]
        if reaching:
            first = min(reaching, key=lambda row: row["nfe"])
            lines.append(
                f"- Restart reaches the best SDE FID ({best_sde['fid']:.4g} at NFE {best_sde['nfe']}) at NFE "
                f"{first['nfe']} ({first['setting']}): "
                f"NFE ratio SDE / Restart = {best_sde['nfe'] / first['nfe']:.2f}"
            )
        else:
            closest = min(restart, key=lambda row: row["fid"])
            lines.append(
                f"- Restart does not reach the best SDE FID ({best_sde['fid']:.4g} at NFE "
                f"{best_sde['nfe']}); its best is {closest['fid']:.4g} at NFE {closest['nfe']}"
            )
    if restart and ode:
        best_ode = min(ode, key=lambda row: row["fid"])
        beating = [row for row in restart if row["fid"] < best_ode["fid"]]
        if beating:
            first = min(beating, key=lambda row: row["nfe"])
            lines.append(
                f"- Restart beats the best ODE FID ({best_ode['fid']:.4g} at NFE {best_ode['nfe']}) from NFE "
                f"{first['nfe']} ({first['setting']}: FID {first['fid']:.4g})"
            )
        else:
            lines.append(
                f"- Restart does not beat the best ODE FID ({best_ode['fid']:.4g} at NFE {best_ode['nfe']})"
            )
    exact = [row for row in rows if row.get("family") == "exact"]
    if exact:
        lines.append(f"- exact mixture samples (the FID floor of this sample size): {exact[0]['fid']:.4g}")
    return "\n".join(lines)


def main() -> None:
    args, overrides = parse_args()
    run_cli(lambda: merge(args) if args.merge else restart_fid_vs_nfe(args, overrides))


if __name__ == "__main__":
    main()
