"""DSNO (one network evaluation) against the teacher's ODE samples, DDIM at few steps and the KD baseline.

The paper's claims (Zheng et al., ICML 2023), measured on one teacher at this project's scale:
  1. DSNO's one-step FID is within ~1.5x of the teacher's ODE samples (CIFAR-10: 3.78 vs 2.51);
  2. it is far ahead of DDIM at comparable cost (DDIM needs ~10 steps to get near it);
  3. the temporal layers beat knowledge distillation (same backbone, final frame only).

Steps:
  1. ``train.py experiment=dsno_fmnist`` (generates the teacher trajectories on first use, cached) and
     ``experiment=dsno_kd_fmnist`` (reuses them), each skipped when ``<out>/<experiment>/model.pt`` exists
     (``--retrain`` forces); training wall time and the data's generation cost are recorded.
  2. Scoring on seeds 0..N-1 (the trajectories use seeds from 1e8 on: no operator is scored on its
     training noise), every row through ``fastsample.jobs.benchmark``'s engine (conf/evaluate.yaml, domain-
     classifier features, cached test-split reference): the teacher with its trajectory sampler, DDIM at
     each ``--ddim`` step count, DSNO and KD (``sampler=dsno``).
  3. ``dsno.{csv,md}`` and a summary with the ratios.

    python bench/dsno.py                                  # the recipe on the shipped model
    python bench/dsno.py --quick                          # CPU-sized pipeline check (a few minutes)
    python bench/dsno.py --samples 5000 trainer.max_steps=4000 dataset.count=20000    # train.py overrides
    python bench/dsno.py --teacher-path teacher.pt --net unet_tiny task.net.image_size=28   # another teacher

Unknown ``key=value`` arguments are Hydra overrides of both training runs (conf/train.yaml).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastsample.jobs.benchmark import compose, fmt  # noqa: E402
from fastsample.utils.errors import run_cli  # noqa: E402

COLUMNS = [
    "method",
    "setting",
    "nfe",
    "fid",
    "kid",
    "sampling_s",
    "ms_per_image",
    "train_steps",
    "train_s",
    "train_frames",
    "data_trajectories",
    "data_teacher_nfe",
    "data_generation_s",
    "val_final_rmse",
]
EXPERIMENTS = {"dsno": "dsno_fmnist", "kd": "dsno_kd_fmnist"}
QUICK_TRAIN = [
    "dataset.count=64",
    "dataset.val_count=16",
    "dataset.chunk_size=32",
    "dataset.sampler.steps=6",
    "dataset.batch_size=8",
    "trainer.max_steps=10",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=5",
    "callbacks.model_checkpoint.every_n_train_steps=10",
    "task.warmup_steps=2",
    "task.grid_every_n_steps=10",
    "task.grid_seeds=16",
]


def ints(text: str) -> list[int]:
    return [int(item) for item in text.split(",") if item.strip()]


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--samples", type=int, default=2000, help="evaluation seeds 0..N-1, the same for every row"
    )
    parser.add_argument("--ddim", default="1,2,4,10", help="DDIM step counts (NFE)")
    parser.add_argument("--ddim-schedule", default="karras", help="sigma schedule of the DDIM rows")
    parser.add_argument("--methods", default="dsno,kd", help="operators to train and score: dsno, kd")
    parser.add_argument("--teacher", default="unet_fmnist", help="conf/model config of the teacher")
    parser.add_argument(
        "--teacher-path", default=None, help="a teacher bundle / .ckpt (model=from_checkpoint)"
    )
    parser.add_argument("--net", default=None, help="conf/net config of the teacher's architecture")
    parser.add_argument("--metrics", default="classifier", help="conf/features config (feature extractor)")
    parser.add_argument("--split", default="test", help="reference split")
    parser.add_argument("--batch-size", type=int, default=250, help="evaluation batch")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--out", default="outputs/bench/dsno", help="output folder (runs in <out>/<experiment>)"
    )
    parser.add_argument(
        "--retrain", action="store_true", help="train even when <out>/<experiment>/model.pt exists"
    )
    parser.add_argument("--quick", action="store_true", help="tiny settings: a pipeline check, not a result")
    args, overrides = parser.parse_known_args(argv)
    unknown = [item for item in overrides if item.startswith("--")]
    if unknown:
        parser.error(f"unknown option(s) {' '.join(unknown)}; Hydra overrides are written key=value")
    args.methods = [name for name in args.methods.split(",") if name]
    for name in args.methods:
        if name not in EXPERIMENTS:
            parser.error(f"--methods: {name!r} is not one of {', '.join(EXPERIMENTS)}")
    if args.quick:
        args.samples = min(args.samples, 100)
        overrides = [*QUICK_TRAIN, *overrides]
    return args, overrides


def compose_config(config: str, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config, overrides=overrides)


def teacher_overrides(args: argparse.Namespace, key: str) -> list[str]:
    """Overrides that select the teacher at config key ``key`` (``model`` or ``dataset.teacher``)."""
    group = "model" if key == "model" else f"model@{key}"
    if args.teacher_path:
        return [f"{group}=from_checkpoint", f"{key}.path={args.teacher_path}"]
    return [f"{group}={args.teacher}"]


def train_overrides(args: argparse.Namespace, name: str, overrides: list[str]) -> list[str]:
    experiment = EXPERIMENTS[name]
    extra = [f"experiment={experiment}", f"paths.output_dir={Path(args.out) / experiment}"]
    extra += teacher_overrides(args, "dataset.teacher")
    if args.net:
        extra.append(f"net@task.net={args.net}")
    if args.device != "auto":
        extra += [
            f"dataset.device={args.device}",
            f"trainer.accelerator={'gpu' if 'cuda' in args.device else 'cpu'}",
        ]
    return [*extra, *overrides]


def train_operator(args: argparse.Namespace, name: str, overrides: list[str]) -> dict:
    """Train (or reuse) one operator; returns its run record (paths, cost, validation error).

    An interrupted training resumes from ``<run>/checkpoints/last.ckpt`` (its wall time then counts the
    resumed part only); a finished one (``model.pt``) is reused unless ``--retrain``.
    """
    from fastsample.jobs.training import train
    from fastsample.utils.instantiation import instantiate
    from fastsample.utils.io import write_json_atomic

    cfg = compose_config("train", [*train_overrides(args, name, overrides), "ckpt_path=last"])
    run_dir = Path(cfg.paths.output_dir)
    model, record_path = run_dir / "model.pt", run_dir / "bench_run.json"
    if model.is_file() and not args.retrain:
        print(f"{name}: reusing {model} (--retrain to train again)", flush=True)
        if record_path.is_file():
            return json.loads(record_path.read_text())
        return run_record(name, model, cfg, seconds=None, features={})
    if args.retrain:
        cfg.ckpt_path = None
    # the trajectories first (a no-op when cached), so that the training time is training alone
    print(f"{name}: teacher trajectories (cached after the first run)", flush=True)
    instantiate(cfg.dataset).prepare_data()
    print(f"{name}: training {EXPERIMENTS[name]} -> {run_dir}", flush=True)
    start = time.perf_counter()
    metrics = train(cfg)
    record = run_record(name, model, cfg, time.perf_counter() - start, metrics)
    write_json_atomic(record_path, record)
    return record


def run_record(name: str, model: Path, cfg, seconds: float | None, metrics: dict) -> dict:
    """What the table reports about a trained operator: training and data cost, validation error."""
    from fastsample.models.dsno import load_operator

    _, operator = load_operator(model)
    extra = operator["extra"]
    cost = extra.get("data_cost") or {}
    frames = operator["settings"]["frames"]
    steps = extra.get("global_step") or 0
    return {
        "method": name,
        "model": str(model),
        "train_steps": steps,
        "train_s": round(seconds, 2) if seconds is not None else None,
        "frames": frames,
        "train_frames": steps * int(cfg.dataset.batch_size) * frames,
        "data_trajectories": cost.get("trajectories"),
        "data_teacher_nfe": cost.get("teacher_nfe_per_trajectory"),
        "data_generation_s": cost.get("generation_s"),
        "val_final_rmse": metrics.get("val/final_rmse"),
    }


def teacher_sampler(cfg):
    """The sampler that made the trajectories, on its exact grid (its schedule with the trajectory levels
    inserted): the teacher row scores the very ODE solutions the operators learn from."""
    from fastsample.samplers import Sampler, insert_sigmas
    from fastsample.utils.instantiation import instantiate

    data = instantiate(cfg.dataset)
    base = data.sampler
    grid = insert_sigmas(base.sigmas(data.teacher_model()), data.sigmas().tolist())
    sampler = Sampler(base.name, len(grid) - 1, {"kind": "explicit", "sigmas": grid.tolist()}, **base.knobs)
    inserted = len(grid) - 1 - base.steps
    sampler.description = f"{base.name} {base.steps} steps ({base.schedule.kind}) + {inserted} levels"
    return sampler


def ddim(steps: int, args: argparse.Namespace, model):
    """DDIM with ``steps`` steps on ``steps + 1`` levels of the schedule whose last (sigma_min) is set to 0.

    The usual grid (``steps`` levels down to sigma_min, then 0) spends its last step on sigma_min -> 0,
    which changes nothing: at 2 steps it is a 1-step sampler. This is the grid of the trajectory levels
    (:func:`fastsample.data.trajectories.trajectory_sigmas`), the fair few-step baseline.
    """
    from fastsample.data.trajectories import trajectory_sigmas
    from fastsample.samplers import Sampler

    levels = trajectory_sigmas(args.ddim_schedule, steps, model)
    return Sampler("ddim", steps, {"kind": "explicit", "sigmas": levels.tolist()})


def eval_base(args: argparse.Namespace, class_labels) -> list[str]:
    return [
        *teacher_overrides(args, "model"),
        f"features={args.metrics}",
        f"split={args.split}",
        f"device={args.device}",
        f"batch_size={args.batch_size}",
        f"seeds={args.samples}",
        f"paths.output_dir={args.out}",
        f"class_labels={'null' if class_labels is None else class_labels}",
        "evaluator.scores=[fid,kid]",
        "evaluator.kid_subsets=50",
        "progress=false",
    ]


def score_rows(args: argparse.Namespace, runs: dict[str, dict], teacher, class_labels) -> list[dict]:
    from fastsample.jobs.evaluation import build_evaluator, prepare_reference
    from fastsample.jobs.setup import build_model, data_shape
    from fastsample.utils.device import resolve_device
    from fastsample.utils.instantiation import instantiate
    from fastsample.utils.seeding import labels_for

    base = eval_base(args, class_labels)
    cfg = compose(base)
    device = resolve_device(cfg.device)
    start = time.perf_counter()
    evaluator = build_evaluator(cfg, device)
    evaluator.reference = prepare_reference(cfg, evaluator)
    print(f"reference: {evaluator.reference.describe()} ({time.perf_counter() - start:.1f} s)", flush=True)
    model = build_model(cfg, device)
    shape = data_shape(cfg, model)
    seeds = list(range(args.samples))
    labels = labels_for(seeds, cfg.get("class_labels"), getattr(model, "num_classes", None))

    plans: list[tuple[str, str, object, dict]] = [("teacher", teacher.description, teacher, {})]
    for steps in ints(args.ddim):
        plans.append(
            ("ddim", f"{steps} steps ({args.ddim_schedule}, ends at 0)", ddim(steps, args, model), {})
        )
    for name, run in runs.items():
        sampler = instantiate(compose([*base, "sampler=dsno", f"sampler.path={run['model']}"]).sampler)
        plans.append((name, f"{run['train_steps']} steps", sampler, run))

    rows = []
    warm = instantiate(compose([*base, "sampler=euler", "sampler.steps=1"]).sampler)
    evaluator.score_sampler(model, warm, seeds[:4], shape=shape, device=device)  # first-call overheads
    for method, setting, sampler, run in plans:
        scores = evaluator.score_sampler(
            model, sampler, seeds, args.batch_size, shape=shape, class_labels=labels, device=device
        )
        row = {key: run.get(key) for key in [*COLUMNS, "frames"]}
        row.update(
            method=method,
            setting=setting,
            nfe=sampler.nfe,
            fid=scores["fid"],
            kid=scores.get("kid_mean"),
            sampling_s=scores["sampling_s"],
            ms_per_image=1000 * scores["sampling_s"] / len(seeds),
        )
        rows.append(row)
        print(
            f"  {method:>8} {setting:>28} NFE {sampler.nfe:>3}: FID {scores['fid']:.4g} "
            f"({scores['sampling_s']:.1f} s)",
            flush=True,
        )
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| method | setting | NFE | FID | KID | ms / image | training steps | training s | frames seen | "
        "data: trajectories x teacher NFE | data generation s | val final RMSE |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        data = (
            f"{row['data_trajectories']} x {row['data_teacher_nfe']}" if row.get("data_trajectories") else "-"
        )
        lines.append(
            f"| {row['method']} | {row['setting']} | {row['nfe']} | {fmt(row['fid'])} | "
            f"{fmt(row['kid'], 3)} | {fmt(row['ms_per_image'], 3)} | {fmt(row.get('train_steps'))} | "
            f"{fmt(row.get('train_s'))} | "
            f"{fmt(row.get('train_frames'))} | {data} | {fmt(row.get('data_generation_s'))} | "
            f"{fmt(row.get('val_final_rmse'), 3)} |"
        )
    return "\n".join(lines)


def summarize(rows: list[dict]) -> str:
    """The paper's three claims as ratios of the measured FIDs."""
    by_method: dict[str, list[dict]] = {}
    for row in rows:
        if row.get("fid") is not None and not math.isnan(row["fid"]):
            by_method.setdefault(row["method"], []).append(row)
    lines = ["Summary:"]
    teacher = (by_method.get("teacher") or [None])[0]
    dsno = (by_method.get("dsno") or [None])[0]
    kd = (by_method.get("kd") or [None])[0]
    ddim = sorted(by_method.get("ddim", []), key=lambda row: row["nfe"])
    if teacher:
        lines.append(f"- teacher ({teacher['setting']}, NFE {teacher['nfe']}): FID {teacher['fid']:.4g}")
    for name, row in (("DSNO", dsno), ("KD", kd)):
        if row and teacher:
            ratio = row["fid"] / teacher["fid"]
            verdict = "within" if ratio <= 1.5 else "outside"
            lines.append(
                f"- {name} (1 NFE): FID {row['fid']:.4g} = {ratio:.2f}x the teacher's "
                f"({verdict} the paper's ~1.5x)"
            )
    if dsno and ddim:
        ratios = ", ".join(f"NFE {row['nfe']}: {row['fid'] / dsno['fid']:.2f}x" for row in ddim)
        lines.append(f"- DDIM FID / DSNO FID: {ratios}")
        same_compute = [row for row in ddim if row["nfe"] == dsno.get("frames")]
        if same_compute:
            row = same_compute[0]
            lines.append(
                f"- at equal backbone compute (DDIM NFE {row['nfe']} = DSNO's one evaluation of {row['nfe']} "
                f"frames): DDIM FID {row['fid']:.4g} = {row['fid'] / dsno['fid']:.2f}x DSNO's"
            )
        matching = [row for row in ddim if row["fid"] <= dsno["fid"]]
        if matching:
            lines.append(f"- DDIM first reaches DSNO's FID at NFE {matching[0]['nfe']} (DSNO: 1)")
        else:
            lines.append(f"- DDIM does not reach DSNO's FID within NFE {ddim[-1]['nfe']}")
    if dsno and kd:
        better = "beat" if dsno["fid"] < kd["fid"] else "do not beat"
        lines.append(
            f"- KD FID / DSNO FID = {kd['fid'] / dsno['fid']:.2f}: the temporal layers {better} KD "
            f"(DSNO saw {fmt(dsno.get('train_frames'))} frames in {fmt(dsno.get('train_s'))} s, "
            f"KD {fmt(kd.get('train_frames'))} in {fmt(kd.get('train_s'))} s)"
        )
    timed = [row for row in (teacher, dsno, kd, *ddim) if row and row.get("ms_per_image") is not None]
    if timed:
        lines.append(
            "- sampling ms / image: "
            + ", ".join(f"{row['method']} NFE {row['nfe']}: {row['ms_per_image']:.3g}" for row in timed)
        )
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict]) -> None:
    from fastsample.utils.io import write_bytes_atomic

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if row.get(key) is None else row[key] for key in COLUMNS})
    write_bytes_atomic(path, buffer.getvalue().encode())


def run(args: argparse.Namespace, overrides: list[str]) -> list[dict]:
    from fastsample.utils.io import write_bytes_atomic

    out = Path(args.out)
    runs = {name: train_operator(args, name, overrides) for name in args.methods}
    reference_cfg = compose_config("train", train_overrides(args, "dsno", overrides))
    rows = score_rows(args, runs, teacher_sampler(reference_cfg), reference_cfg.dataset.class_labels)
    title = (
        f"{args.teacher_path or args.teacher}, {args.samples} samples (seeds 0-{args.samples - 1}), "
        f"{args.metrics} features{' (--quick: a pipeline check, not a result)' if args.quick else ''}"
    )
    table, summary = markdown_table(rows), summarize(rows)
    write_csv(out / "dsno.csv", rows)
    write_bytes_atomic(out / "dsno.md", f"{title}\n\n{table}\n\n{summary}\n".encode())
    print(f"\n{title}\n\n{table}\n\n{summary}\n\ntable: {out / 'dsno.md'}\nCSV: {out / 'dsno.csv'}")
    return rows


def main() -> None:
    args, overrides = parse_args()
    run_cli(lambda: run(args, overrides))


if __name__ == "__main__":
    main()
