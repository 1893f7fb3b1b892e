"""Guided sampling with splitting (Wizadwongsa & Suwajanakorn, ICLR 2023): DDIM, PLMS-4 on the summed
field, LTSP-4 and STSP-4 across guidance scales and step counts, with the same noise for all.

Per (scale, method, steps) it reports FID (domain features), the target-class accuracy of a clean
classifier, the distance to a 1000-step DDIM solution of the same guided ODE from the same noise,
the fraction of saturated pixels (|x| >= 1) and the sampling wall time; per scale it also runs
250-step DDIM (the paper's quality target) and reports, for each method, the fewest steps that
reach its FID and the wall-time saving against it (the paper: 32-58% less time on ImageNet).

    # the shipped Fashion-MNIST model + its noise-conditioned guidance classifier (make pretrain):
    python bench/guided_splitting.py
    # the analytic Fashion-MNIST mixture with its exact class posterior (works without any asset):
    python bench/guided_splitting.py --model gmm_fmnist --num-samples 200 --scales 2,10 --steps 5,10,20
    python bench/guided_splitting.py --model from_checkpoint model.path=outputs/train/.../model.pt \\
        --classifier outputs/train/.../classifier.pt       # any evaluate.yaml override after the options

Guidance: ``--guidance classifier`` (a noise-conditioned classifier, ``--classifier`` = bundle path or
asset name) or ``gmm_posterior`` (exact posterior; the default for ``gmm_*`` models). The diffusion
model runs unconditionally; targets are ``seed mod classes``. Metrics: ``--metrics classifier``
(conf/features/classifier.yaml: the shipped clean classifier, features + logits) or ``mixture``
(analytic mixtures: principal-subspace features of the mixture and its exact posterior at
sigma_min as the clean classifier); ``auto`` picks ``mixture`` for mixtures when the shipped
classifier is not built. Writes ``guided_splitting.csv`` / ``.md`` to ``--out``.
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
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastsample.guidance import ClassifierGuidance, MixturePosteriorGuidance  # noqa: E402
from fastsample.jobs.evaluation import build_evaluator, prepare_reference  # noqa: E402
from fastsample.jobs.setup import build_model, data_shape  # noqa: E402
from fastsample.lit.loading import DEFAULT_CLASSIFIER  # noqa: E402
from fastsample.metrics import ModuleFeatures  # noqa: E402
from fastsample.metrics.evaluator import Evaluator  # noqa: E402
from fastsample.models.bundle import assets_dir  # noqa: E402
from fastsample.samplers import Sampler  # noqa: E402
from fastsample.samplers.generation import generate_batch  # noqa: E402
from fastsample.utils.device import resolve_device  # noqa: E402
from fastsample.utils.errors import check_choice, fail, run_cli  # noqa: E402
from fastsample.utils.io import write_bytes_atomic  # noqa: E402

#: method -> (registry sampler, knobs); every method runs on the same schedule
METHODS = {
    "ddim": ("ddim", {}),
    "plms": ("plms", {"order": 4}),
    "ltsp": ("ltsp", {"base": "plms", "order": 4}),
    "stsp": ("stsp", {"base": "plms", "order": 4}),
    "stsp_literal": ("stsp", {"base": "plms", "order": 4, "corrector": False, "model_at": "opened"}),
}
COLUMNS = [
    "scale",
    "method",
    "steps",
    "nfe",
    "grad_evals",
    "fid",
    "accuracy",
    "dist_ref",
    "saturated",
    "sampling_s",
    "ms_per_image",
]


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default="unet_fmnist", help="conf/model config (default: the shipped UNet)"
    )
    parser.add_argument("--guidance", default="auto", help="classifier | gmm_posterior | auto")
    parser.add_argument(
        "--classifier",
        default="fmnist_guidance_classifier.pt",
        help="guidance classifier: bundle path or asset",
    )
    parser.add_argument("--scales", default="1,2,5,10", help="comma-separated guidance scales")
    parser.add_argument("--steps", default="5,10,20,50", help="comma-separated step counts")
    parser.add_argument(
        "--methods", default="ddim,plms,ltsp,stsp", help=f"comma-separated: {', '.join(METHODS)}"
    )
    parser.add_argument("--schedule", default="time_uniform", help="sigma schedule of every method")
    parser.add_argument("--num-samples", type=int, default=1000, help="samples per row (FID, accuracy)")
    parser.add_argument("--ref-steps", type=int, default=1000, help="DDIM steps of the reference solution")
    parser.add_argument(
        "--ref-samples", type=int, default=200, help="seeds with a reference (distance column)"
    )
    parser.add_argument(
        "--quality-steps", type=int, default=250, help="DDIM steps of the quality target (0: none)"
    )
    parser.add_argument("--metrics", default="auto", help="classifier | mixture | auto")
    parser.add_argument(
        "--dataset", default=None, help="conf/dataset of the FID reference (default fashion_mnist)"
    )
    parser.add_argument("--split", default="test", help="reference split")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="outputs/bench/guided_splitting", help="output folder")
    return parser.parse_known_args(argv)


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose("evaluate", overrides=overrides)


# -- metrics for analytic mixtures ---------------------------------------------------------------------


class MixtureFeatures(nn.Module):
    """Features of an analytic mixture's data space: coordinates in the top principal directions of
    the mixture's covariance (computed from its parameters), and as logits its exact class posterior
    at ``sigma_min`` (the Bayes classifier of the clean data)."""

    def __init__(self, mixture, dims: int = 64) -> None:
        super().__init__()
        self.mixture = mixture
        weights = mixture.log_weights.exp()
        mean = (weights[:, None] * mixture.means).sum(0)
        covariance = torch.zeros(mixture.dim, mixture.dim, dtype=torch.float64)
        for k in range(len(weights)):
            basis = mixture.bases[k]
            component = basis @ torch.diag(mixture.var_top[k] - mixture.var_rest[k]) @ basis.T
            component += mixture.var_rest[k] * torch.eye(mixture.dim, dtype=torch.float64)
            offset = mixture.means[k] - mean
            covariance += weights[k] * (component + torch.outer(offset, offset))
        _, vectors = torch.linalg.eigh(covariance)
        self.register_buffer("basis", vectors[:, -dims:].flip(1).contiguous())
        self.register_buffer("center", mean)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = x.reshape(len(x), -1).double()
        features = (flat - self.center) @ self.basis
        logits = self.mixture.class_log_posterior(flat.reshape(len(x), *self.mixture.image_shape), 0.002)
        return features.float(), logits.float()


def is_mixture(model) -> bool:
    return hasattr(model, "class_log_posterior") and hasattr(model, "log_prob")


def build_metrics(args: argparse.Namespace, cfg, model, device) -> Evaluator:
    choice = args.metrics
    if choice == "auto":
        shipped = (assets_dir() / DEFAULT_CLASSIFIER).is_file() or cfg.features.get("path")
        choice = "mixture" if is_mixture(model) and not shipped else "classifier"
    check_choice("--metrics", choice, ("classifier", "mixture"))
    if choice == "classifier":
        return build_evaluator(cfg, device)
    if not is_mixture(model):
        fail("--metrics mixture needs an analytic mixture model (--model gmm_*)")
    settings = {**dict(cfg.get("evaluator") or {}), "batch_size": args.batch_size, "progress": False}
    extractor = ModuleFeatures(MixtureFeatures(model).to(device), label="mixture-pca64")
    return Evaluator(extractor, None, device=device, **settings)


def build_guidance(args: argparse.Namespace, model, scale: float):
    choice = args.guidance
    if choice == "auto":
        choice = "gmm_posterior" if is_mixture(model) else "classifier"
    check_choice("--guidance", choice, ("classifier", "gmm_posterior"))
    if choice == "gmm_posterior":
        return MixturePosteriorGuidance(scale)
    return ClassifierGuidance(args.classifier, scale=scale)


# -- one configuration ---------------------------------------------------------------------------------


def sample_all(
    sampler: Sampler, model, task, seeds, shape, labels, batch_size: int, device
) -> tuple[torch.Tensor, float]:
    """Samples of ``seeds`` (float32, CPU) and the sampling wall time."""
    outputs, elapsed = [], 0.0
    for start in range(0, len(seeds), batch_size):
        batch = seeds[start : start + batch_size]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        begin = time.perf_counter()
        with torch.no_grad():
            images = generate_batch(
                sampler, model, batch, shape, labels[start : start + batch_size], task, device
            )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed += time.perf_counter() - begin
        outputs.append(images.float().cpu())
    return torch.cat(outputs), elapsed


def score(
    evaluator: Evaluator, images: torch.Tensor, labels: torch.Tensor, batch_size: int
) -> tuple[float, float]:
    """FID and target-class accuracy of ``images`` (clamped to [-1, 1] for the feature network)."""
    batches = [images[i : i + batch_size].clamp(-1, 1) for i in range(0, len(images), batch_size)]
    stats = evaluator.features(iter(batches), what="guided samples")
    fid = evaluator.score_stats(stats)["fid"]
    accuracy = float("nan")
    if stats.logits is not None and len(stats.logits) == len(images):
        predicted = torch.as_tensor(stats.logits).argmax(dim=1)
        accuracy = float((predicted == labels.cpu()).float().mean())
    return fid, accuracy


def make_sampler(method: str, steps: int, schedule: str) -> Sampler:
    name, knobs = METHODS[method]
    return Sampler(name, steps, {"kind": schedule}, **knobs)


def run(args: argparse.Namespace, overrides: list[str]) -> list[dict]:
    out = Path(args.out)
    scales = [float(s) for s in args.scales.split(",") if s]
    steps_list = [int(n) for n in args.steps.split(",") if n]
    methods = [m for m in args.methods.split(",") if m]
    for method in methods:
        check_choice("--methods", method, METHODS)
    seeds = list(range(args.num_samples))
    ref_count = min(args.ref_samples, len(seeds))
    base = [
        f"model={args.model}",
        f"split={args.split}",
        f"device={args.device}",
        f"batch_size={args.batch_size}",
        f"paths.output_dir={out}",
        "evaluator.scores=[fid]",
        "progress=false",
    ]
    if args.metrics == "classifier":
        base.append("features=classifier")
    if args.dataset:
        base.append(f"dataset={args.dataset}")
    cfg = compose(base + overrides)
    device = resolve_device(cfg.device)
    model = build_model(cfg, device)
    shape = data_shape(cfg, model)
    evaluator = build_metrics(args, cfg, model, device)
    evaluator.reference = prepare_reference(cfg, evaluator)
    probe = build_guidance(args, model, 0.0)
    classes = probe.num_classes(model)
    if not classes:
        fail("guided benchmark: the guidance has no classes to target")
    labels = torch.tensor([seed % classes for seed in seeds])
    print(
        f"model {args.model} on {device}; metrics {evaluator.extractor.name}; {len(seeds)} seeds", flush=True
    )

    rows: list[dict] = []
    for scale in scales:
        task = build_guidance(args, model, scale)
        begin = time.perf_counter()
        reference, _ = sample_all(
            make_sampler("ddim", args.ref_steps, args.schedule), model, task, seeds[:ref_count], shape,
            labels[:ref_count], args.batch_size, device,
        )  # fmt: skip
        print(
            f"scale {scale:g}: {args.ref_steps}-step DDIM reference ({time.perf_counter() - begin:.1f} s)",
            flush=True,
        )
        configs = [(method, steps) for method in methods for steps in steps_list]
        if args.quality_steps:
            configs.append(("ddim", args.quality_steps))
        for method, steps in configs:
            sampler = make_sampler(method, steps, args.schedule)
            task.stats.reset()
            images, elapsed = sample_all(sampler, model, task, seeds, shape, labels, args.batch_size, device)
            batches = math.ceil(len(seeds) / args.batch_size)
            fid, accuracy = score(evaluator, images, labels, args.batch_size)
            distance = (images[:ref_count] - reference).flatten(1).norm(dim=1) / math.sqrt(images[0].numel())
            name = METHODS[method][0]
            rows.append(
                {
                    "scale": scale,
                    "method": method if (method, steps) != ("ddim", args.quality_steps) else f"ddim{steps}",
                    "steps": steps,
                    "nfe": sampler.nfe,
                    # per batch: splitting counts its own; the summed field evaluates g with every call
                    "grad_evals": task.stats.grad_evals // batches
                    if name in ("ltsp", "stsp")
                    else sampler.nfe,
                    "fid": fid,
                    "accuracy": accuracy,
                    "dist_ref": float(distance.mean()),
                    "saturated": float((images.abs() >= 1).float().mean()),
                    "sampling_s": elapsed,
                    "ms_per_image": 1000 * elapsed / len(seeds),
                }
            )
            row = rows[-1]
            print(
                f"  s={scale:<4g} {row['method']:>12} {steps:>4} steps: FID {fid:8.3f}  acc {accuracy:.3f}  "
                f"dist {row['dist_ref']:.4f}  sat {row['saturated']:.3f}  {elapsed:7.2f} s",
                flush=True,
            )
    write_csv(out / "guided_splitting.csv", rows)
    data_saturated = saturated_fraction_of_data(cfg, evaluator.batch_size)
    table = (
        f"{args.model}, {len(seeds)} samples, {args.schedule} steps, distance to a {args.ref_steps}-step "
        f"DDIM solution over {ref_count} seeds (RMS per pixel); saturated: fraction of pixels with |x| >= 1 "
        f"(the {args.split} data: {data_saturated:.3f}).\n\n"
        + markdown_table(rows)
        + "\n\n"
        + savings_table(rows, args.quality_steps)
    )
    write_bytes_atomic(out / "guided_splitting.md", (table + "\n").encode())
    print()
    print(table)
    print(f"\nCSV: {out / 'guided_splitting.csv'}\ntables: {out / 'guided_splitting.md'}")
    return rows


# -- reporting --------------------------------------------------------------------------------------


def saturated_fraction_of_data(cfg, batch_size: int) -> float:
    """Fraction of the reference data's pixels with |x| >= 1 (a background of -1 counts): the baseline."""
    from torch.utils.data import DataLoader

    from fastsample.jobs.evaluation import reference_datamodule

    total = count = 0.0
    for images, _ in DataLoader(
        reference_datamodule(cfg).dataset(cfg.split), batch_size=max(batch_size, 1000)
    ):
        total += float((images.abs() >= 1).sum())
        count += images.numel()
    return total / max(count, 1)


def fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def write_csv(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    for row in rows:
        writer.writerow({key: row[key] for key in COLUMNS})
    write_bytes_atomic(path, buffer.getvalue().encode())


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| scale | method | steps | NFE | grad evals | FID | target acc | dist to ref | saturated "
        "| sampling s |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['scale']:g} | {row['method']} | {row['steps']} | {row['nfe']} | {row['grad_evals']} | "
            f"{fmt(row['fid'])} | {fmt(row['accuracy'], 3)} | {fmt(row['dist_ref'], 3)} | "
            f"{fmt(row['saturated'], 3)} | {fmt(row['sampling_s'], 3)} |"
        )
    return "\n".join(lines)


def savings_table(rows: list[dict], quality_steps: int) -> str:
    """Per scale and method: the fewest steps reaching the quality-target DDIM's FID, and the time saved."""
    if not quality_steps:
        return ""
    target_name = f"ddim{quality_steps}"
    lines = [
        f"| scale | method | DDIM-{quality_steps} FID | fewest steps reaching it | their time s | "
        f"DDIM-{quality_steps} time s | time saving |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for scale in dict.fromkeys(row["scale"] for row in rows):
        target = next((r for r in rows if r["scale"] == scale and r["method"] == target_name), None)
        if target is None:
            continue
        for method in dict.fromkeys(r["method"] for r in rows if r["scale"] == scale and r is not target):
            mine = sorted(
                (r for r in rows if r["scale"] == scale and r["method"] == method), key=lambda r: r["steps"]
            )
            match = next((r for r in mine if r["fid"] <= target["fid"]), None)
            saving = f"{100 * (1 - match['sampling_s'] / target['sampling_s']):.0f}%" if match else "-"
            steps, seconds = (match["steps"], fmt(match["sampling_s"], 3)) if match else ("none", "-")
            lines.append(
                f"| {scale:g} | {method} | {fmt(target['fid'])} | {steps} | {seconds} | "
                f"{fmt(target['sampling_s'], 3)} | {saving} |"
            )
    return "\n".join(lines)


def main() -> None:
    args, overrides = parse_args()
    unknown = [item for item in overrides if item.startswith("--")]
    if unknown:
        sys.exit(f"error: unknown option(s) {' '.join(unknown)}; Hydra overrides are written key=value")
    run_cli(lambda: run(args, overrides))


if __name__ == "__main__":
    main()
