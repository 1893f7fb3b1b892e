"""Image grids of inverse problems (inpainting, super-resolution, colorization) for docs/guidance.md.

For each task: rows are samples; columns the ground truth, the measurement (missing pixels grey,
the low-resolution image upsampled, the grayscale image) and the result of each sampler from the
same noise and the same measurement. Also prints per sampler the measurement residual
``||A(x) - y||`` and the RMS distance to the ground truth.

    python bench/inverse_examples.py                    # analytic mixtures: gmm_fmnist + gmm_patches (RGB)
    python bench/inverse_examples.py --model unet_fmnist --tasks inpaint,superres   # the shipped model
    python bench/inverse_examples.py --rgb-model from_checkpoint --rgb-dataset cifar10 \\
        --rgb-override model.path=outputs/train/.../model.pt

Grayscale tasks use ``--model`` / ``--dataset``, colorization ``--rgb-model`` / ``--rgb-dataset``
(default: the mixture of the offline sample-photo patches). Ground truths come from the dataset's
test split (``guidance.source=dataset``); settings of conf/guidance/<task>.yaml can be overridden
with ``--set guidance.scale=2`` (repeatable). Writes ``<task>.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastsample.jobs.setup import build_guidance, build_model, data_shape  # noqa: E402
from fastsample.samplers import Sampler  # noqa: E402
from fastsample.utils.device import resolve_device  # noqa: E402
from fastsample.utils.errors import check_choice, run_cli  # noqa: E402
from fastsample.utils.io import write_bytes_atomic  # noqa: E402
from fastsample.utils.seeding import SeedNoise  # noqa: E402

TASKS = ("inpaint", "superres", "colorize")
METHODS = {
    "ddim": ("ddim", {}),
    "plms": ("plms", {"order": 4}),
    "ltsp": ("ltsp", {"base": "plms", "order": 4}),
    "stsp": ("stsp", {"base": "plms", "order": 4}),
}
TITLES = {"ddim": "DDIM", "plms": "PLMS-4 (summed)", "ltsp": "LTSP-4", "stsp": "STSP-4"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", default="inpaint,superres,colorize")
    parser.add_argument("--model", default="gmm_fmnist", help="conf/model for inpaint / superres")
    parser.add_argument("--dataset", default="fashion_mnist", help="conf/dataset of --model's ground truths")
    parser.add_argument("--rgb-model", default="gmm_patches", help="conf/model for colorize")
    parser.add_argument("--rgb-dataset", default="sample_patches", help="conf/dataset of --rgb-model")
    parser.add_argument(
        "--rgb-override", action="append", default=[], help="extra override for the RGB model"
    )
    parser.add_argument("--set", action="append", default=[], help="override, e.g. guidance.scale=2")
    parser.add_argument("--methods", default="plms,ltsp,stsp", help=f"comma-separated: {', '.join(METHODS)}")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--schedule", default="time_uniform")
    parser.add_argument("--count", type=int, default=6, help="samples (rows) per grid")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="docs/images/guidance", help="folder of the PNG grids")
    return parser.parse_args(argv)


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose("sample", overrides=overrides)


def measurement_image(task, y: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The measurement shown in data space: masked pixels grey, low-res upsampled, gray as RGB."""
    operator = task.operator
    if task.name == "inpaint":
        mask = operator.mask_for(shape).to(y)
        return y * mask + (1 - mask) * 0.0
    if task.name == "colorize":
        return y.expand(-1, 3, -1, -1)
    return operator.pinv(y)


def run_task(name: str, args: argparse.Namespace) -> dict[str, tuple[float, float]]:
    rgb = name == "colorize"
    overrides = [
        f"model={args.rgb_model if rgb else args.model}",
        f"dataset={args.rgb_dataset if rgb else args.dataset}",
        f"guidance={name}",
        "guidance.source=dataset",
        f"device={args.device}",
        *(args.rgb_override if rgb else []),
        *args.set,
    ]
    cfg = compose(overrides)
    device = resolve_device(cfg.device)
    model = build_model(cfg, device)
    shape = data_shape(cfg, model)
    task = build_guidance(cfg)
    seeds = list(range(args.first_seed, args.first_seed + args.count))
    run = task.setup(model, seeds=seeds, shape=shape, device=device)
    noise = SeedNoise(seeds).randn(shape, device=device)
    columns = [
        ("ground truth", run.reference),
        ("measurement", measurement_image(task, run.measurement, shape)),
    ]
    report = {}
    for method in args.methods.split(","):
        check_choice("--methods", method, METHODS)
        sampler_name, knobs = METHODS[method]
        sampler = Sampler(sampler_name, args.steps, {"kind": args.schedule}, **knobs)
        with torch.no_grad():
            out = sampler.sample(
                run.denoiser, noise, cond=run.cond, guidance=run.guidance, sigmas=sampler.sigmas(model)
            )
        residual = float((task.operator(out) - run.measurement).flatten(1).norm(dim=1).mean())
        rms = float((out - run.reference).pow(2).mean().sqrt())
        report[method] = (residual, rms)
        columns.append((TITLES[method], out))
    settings = task.describe()
    title = (
        f"{name}: model={args.rgb_model if rgb else args.model}, dataset={cfg.dataset.get('name')}, "
        f"scale {settings['scale']:g}, projection {settings['projection']}, {args.steps} steps"
    )
    save_figure(Path(args.out) / f"{name}.png", columns, title)
    print(f"\n{title}")
    print("| sampler | mean residual ||A(x) - y|| | RMS to ground truth |")
    print("|---|---:|---:|")
    for method, (residual, rms) in report.items():
        print(f"| {TITLES[method]} | {residual:.3g} | {rms:.3f} |")
    return report


def save_figure(path: Path, columns: list[tuple[str, torch.Tensor]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = len(columns[0][1])
    figure, axes = plt.subplots(
        rows, len(columns), figsize=(1.3 * len(columns), 1.3 * rows + 0.5), squeeze=False
    )
    for j, (label, images) in enumerate(columns):
        for i in range(rows):
            image = ((images[i].detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
            axis = axes[i][j]
            axis.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1)
            axis.set_xticks([])
            axis.set_yticks([])
            if i == 0:
                axis.set_title(label, fontsize=7)
    figure.suptitle(title, fontsize=7)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    write_bytes_atomic(path, buffer.getvalue())


def main() -> None:
    args = parse_args()
    for name in args.tasks.split(","):
        check_choice("--tasks", name, TASKS)
    run_cli(lambda: [run_task(name, args) for name in args.tasks.split(",")])
    print(f"\ngrids: {args.out}/<task>.png")


if __name__ == "__main__":
    main()
