"""Sampling throughput on one UNet: fastsample vs diffusers' pipeline loop vs k-diffusion.

The same network (the shipped Fashion-MNIST UNet, EDM-preconditioned), the same solver
(DPM-Solver++(2M), 10 model calls) and the same speed options (fastsample's ``NetworkOptions``: float32,
bfloat16 autocast, channels_last, ``torch.compile``, CUDA graphs through ``compile_mode=reduce-overhead``)
for every library, so the rows differ only in what each library does around the network:

- ``fastsample``: ``generate_batch`` (per-seed noise, the sampler with its non-finite guard), what
  ``sample.py`` runs per batch;
- ``diffusers``: ``DDPMPipeline.__call__`` (``randn_tensor``, ``scheduler.step`` per call) with
  ``DPMSolverMultistepScheduler``, the UNet seen as a diffusers epsilon model on the scheduler's own
  (linear, T = 1000) table through :class:`EpsUNet`;
- ``k-diffusion``: ``torch.randn`` noise then ``k_diffusion.sampling.sample_dpmpp_2m`` on Karras sigmas.

Per (library, options, batch): images/s and ``overhead = wall / (NFE x one bare model call)`` (1.00: the
library costs its model calls and nothing more), medians of ``--repeats`` timed runs after warm-up runs.
fastsample's rows also give ``noise ms`` (its per-seed CPU noise, part of the wall) and ``max diff vs fp32``
(its samples against the plain float32 network's, same seeds: a broken compiled graph shows), and on
CUDA every row counts the host synchronizations of one run (``torch.cuda.set_sync_debug_mode``): where
a library is slower than its model calls, these say why. Before timing, every library's model calls are
counted (all must be the NFE) and fastsample's samples are compared with k-diffusion's from the same
noise (the same solver: they agree to float rounding).

    python bench/gpu_throughput.py                       # CUDA: shipped UNet, batch 256 and 1024, all options
    python bench/gpu_throughput.py --batches 1024 --options bf16+cl+compile --out DIR
    python bench/gpu_throughput.py --quick               # CPU: tiny UNet, batch 8 / 16 (the test runs it)

Needs ``pip install fastsample[diffusers]`` and k-diffusion (``make install`` installs both); prints a
markdown table, and with ``--out`` writes ``gpu_throughput.{md,json}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastsample.diffusion import CountingDenoiser, EDMDenoiser  # noqa: E402
from fastsample.diffusion.accel import NetworkOptions, apply_network_options  # noqa: E402
from fastsample.models.bundle import load_asset  # noqa: E402
from fastsample.models.unet import UNet  # noqa: E402
from fastsample.samplers import Sampler  # noqa: E402
from fastsample.samplers.generation import generate_batch  # noqa: E402
from fastsample.utils.quiet import quiet_third_party  # noqa: E402
from fastsample.utils.seeding import SeedNoise  # noqa: E402

#: the speed options of every row: name -> fastsample.diffusion.accel.NetworkOptions settings
OPTIONS = {
    "fp32": {},
    "bf16": {"network_precision": "bfloat16"},
    "bf16+cl": {"network_precision": "bfloat16", "channels_last": True},
    "bf16+cl+compile": {"network_precision": "bfloat16", "channels_last": True, "compile": True},
    "bf16+cl+graphs": {
        "network_precision": "bfloat16",
        "channels_last": True,
        "compile": True,
        "compile_mode": "reduce-overhead",
    },
}
QUICK_OPTIONS = ("fp32", "bf16", "bf16+cl")
LIBRARIES = ("fastsample", "diffusers", "k-diffusion")
NUM_CLASSES = 10


def tiny_model() -> EDMDenoiser:
    """A class-conditional UNet of ~0.2M parameters on 1 x 8 x 8 (the CPU quick mode)."""
    torch.manual_seed(0)
    net = UNet(
        in_channels=1,
        image_size=8,
        model_channels=16,
        channel_mult=[1, 2],
        num_res_blocks=1,
        attention_resolutions=[],
        num_classes=NUM_CLASSES,
        mid_attention=False,
    )
    with torch.no_grad():  # a fresh UNet's output layer is zero (D = c_skip x): give every weight a value
        for parameter in net.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return EDMDenoiser(net, image_shape=(1, 8, 8), num_classes=NUM_CLASSES)


class EpsUNet(nn.Module):
    """The EDM denoiser as a diffusers epsilon UNet on a discrete VP table (what a pipeline calls).

    ``unet(sample, t).sample`` with ``sample = x / sqrt(1 + sigma_t^2)``: the denoiser sees
    ``x = sample * sqrt(1 + sigma^2)`` and the epsilon is ``(x - D(x, sigma)) / sigma`` (docs/diffusers.md).
    """

    def __init__(self, denoiser: nn.Module, alphas_cumprod: torch.Tensor, labels: torch.Tensor) -> None:
        super().__init__()
        self.denoiser, self.labels = denoiser, labels
        self.register_buffer("sigma_table", ((1 - alphas_cumprod) / alphas_cumprod).sqrt().float())
        channels, size = denoiser.image_shape[0], denoiser.image_shape[-1]
        self.config = SimpleNamespace(sample_size=size, in_channels=channels)

    @property
    def dtype(self) -> torch.dtype:  # what a pipeline reads to make its noise
        return torch.float32

    @property
    def device(self) -> torch.device:  # where a pipeline puts its noise
        return self.sigma_table.device

    def forward(self, sample: torch.Tensor, timestep: Any) -> SimpleNamespace:
        # the pipeline's timesteps live on the CPU: indexing with a Python int costs no device sync
        sigma = self.sigma_table[int(timestep)].expand(len(sample))
        x = sample * (1 + sigma**2).sqrt().view(-1, 1, 1, 1)
        denoised = self.denoiser(x, sigma, class_labels=self.labels)
        return SimpleNamespace(sample=(x - denoised) / sigma.view(-1, 1, 1, 1))


def runners(model: nn.Module, batch: int, device: torch.device, steps: int) -> dict[str, Callable[[], Any]]:
    """One zero-argument call per library that samples ``batch`` images with ``model``."""
    from diffusers import DDPMPipeline, DPMSolverMultistepScheduler
    from k_diffusion.sampling import get_sigmas_karras, sample_dpmpp_2m

    shape = tuple(model.image_shape)
    labels = torch.arange(batch, device=device) % NUM_CLASSES
    seeds = list(range(batch))
    sampler = Sampler("dpmpp_2m", steps)
    scheduler = DPMSolverMultistepScheduler()
    pipeline = DDPMPipeline(
        unet=EpsUNet(model, scheduler.alphas_cumprod, labels).to(device), scheduler=scheduler
    )
    pipeline.set_progress_bar_config(disable=True)
    sigmas = get_sigmas_karras(steps, model.sigma_min, model.sigma_max, device=device)
    generator = torch.Generator(device).manual_seed(0)

    def k_diffusion() -> torch.Tensor:
        noise = torch.randn((batch, *shape), generator=generator, device=device)
        return sample_dpmpp_2m(model, noise * sigmas[0], sigmas, {"class_labels": labels}, disable=True)

    return {
        "fastsample": lambda: generate_batch(sampler, model, seeds, shape, labels, None, device),
        "diffusers": lambda: (
            pipeline(
                batch_size=batch, num_inference_steps=steps, output_type="pt", generator=generator
            ).images
        ),
        "k-diffusion": k_diffusion,
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(call: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median wall seconds of ``repeats`` calls, each between device synchronizations."""
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        call()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def host_syncs(call: Callable[[], Any], device: torch.device) -> int | None:
    """Host-device synchronizations in one call (CUDA only): torch warns once per synchronizing op."""
    if device.type != "cuda":
        return None
    sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            call()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(warning.message) for warning in caught)


def check_libraries(base: nn.Module, device: torch.device, steps: int, batch: int = 4) -> dict[str, Any]:
    """Model calls per library (each must be the NFE) and fastsample vs k-diffusion from the same noise."""
    from k_diffusion.sampling import get_sigmas_karras, sample_dpmpp_2m

    counter = CountingDenoiser(base)
    calls = {}
    for name, call in runners(counter, batch, device, steps).items():
        counter.calls = 0
        with torch.no_grad():
            call()
        calls[name] = counter.calls
    shape, seeds = tuple(base.image_shape), list(range(batch))
    labels = torch.arange(batch, device=device) % NUM_CLASSES
    noise = SeedNoise(seeds).randn(shape, device=device)
    sigmas = get_sigmas_karras(steps, base.sigma_min, base.sigma_max, device=device)
    with torch.no_grad():
        ours = generate_batch(Sampler("dpmpp_2m", steps), base, seeds, shape, labels, None, device)
        theirs = sample_dpmpp_2m(base, noise * sigmas[0], sigmas, {"class_labels": labels}, disable=True)
    return {"calls": calls, "max_abs_diff_vs_k_diffusion": float((ours - theirs).abs().max())}


def measure(
    base: nn.Module, option: str, batch: int, device: torch.device, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """The rows of one (options, batch): a bare model call, then each library's sampling run.

    A library that fails with these options (e.g. a compiled graph it cannot run) gives a row with
    ``error`` instead of stopping the benchmark: the table then says which combination failed.
    """
    model = apply_network_options(copy.deepcopy(base), NetworkOptions(**OPTIONS[option]))
    shape = tuple(base.image_shape)
    x = torch.randn((batch, *shape), device=device)
    sigma = torch.full((batch,), 1.0, device=device)
    labels = torch.arange(batch, device=device) % NUM_CLASSES
    rows = []
    with torch.no_grad():
        timed(lambda: model(x, sigma, class_labels=labels), device, args.warmup)  # compiles, autotunes
        bare = timed(lambda: model(x, sigma, class_labels=labels), device, max(args.repeats, 5))
        for library, call in runners(model, batch, device, args.steps).items():
            if library not in args.libraries:
                continue
            row = {"library": library, "options": option, "batch": batch, "nfe": args.steps}
            try:
                row.update(time_library(call, bare, batch, device, args))
            except (RuntimeError, AssertionError) as err:  # torch / inductor / a library's own checks
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
            if library == "fastsample" and "error" not in row:
                row.update(fastsample_extras(base, call, batch, device, args))
            rows.append(row)
            print(format_row(row), flush=True)
    return rows


def fastsample_extras(
    base: nn.Module, call: Callable[[], Any], batch: int, device: torch.device, args: argparse.Namespace
) -> dict[str, float]:
    """fastsample's per-seed CPU noise time (a part of its wall), and how far its samples with these
    options are from the plain float32 network's (the same seeds; bfloat16 moves them ~1e-2, a compiled
    graph that reused a buffer still in use would move them by O(1))."""
    seeds, shape = list(range(batch)), tuple(base.image_shape)
    labels = torch.arange(batch, device=device) % NUM_CLASSES
    reference = generate_batch(Sampler("dpmpp_2m", args.steps), base, seeds, shape, labels, None, device)
    noise = timed(lambda: SeedNoise(seeds).randn(shape, device=device), device, args.repeats)
    return {"noise_ms": 1000 * noise, "max_diff_vs_fp32": float((call() - reference).abs().max())}


def time_library(
    call: Callable[[], Any], bare: float, batch: int, device: torch.device, args: argparse.Namespace
) -> dict[str, Any]:
    """images/s, wall and overhead of one library's run (after warm-up runs), and its host syncs."""
    timed(call, device, args.warmup)
    wall = timed(call, device, args.repeats)
    return {
        "images_per_s": batch / wall,
        "wall_ms": 1000 * wall,
        "bare_call_ms": 1000 * bare,
        "overhead": wall / (args.steps * bare),
        "host_syncs": host_syncs(call, device),
    }


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


HEADER = (
    "| library | options | batch | NFE | images/s | wall ms | bare call ms | overhead | noise ms "
    "| host syncs | max diff vs fp32 |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def format_row(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"| {row['library']} | {row['options']} | {row['batch']} | {row['nfe']} | {row['error']} |"
    return (
        f"| {row['library']} | {row['options']} | {row['batch']} | {row['nfe']} | "
        f"{fmt(row['images_per_s'], 4)} | {fmt(row['wall_ms'], 4)} | {fmt(row['bare_call_ms'], 3)} | "
        f"{row['overhead']:.3f} | {fmt(row.get('noise_ms'))} | {fmt(row.get('host_syncs'))} | "
        f"{fmt(row.get('max_diff_vs_fp32'), 2)} |"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="CPU, tiny UNet, batch 8 / 16, 3 options")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --quick)")
    parser.add_argument("--batches", default=None, help="comma-separated (default 256,1024; quick 8,16)")
    parser.add_argument("--options", default=None, help=f"comma-separated of {', '.join(OPTIONS)}")
    parser.add_argument("--libraries", default=",".join(LIBRARIES))
    parser.add_argument("--steps", type=int, default=10, help="DPM-Solver++(2M) steps = NFE")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per row (default 10; quick 2)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs first (compilation, autotuning)")
    parser.add_argument("--out", default=None, help="folder for gpu_throughput.{md,json}")
    args = parser.parse_args(argv)
    args.device = torch.device(args.device or ("cpu" if args.quick else "cuda"))
    args.batches = [int(b) for b in (args.batches or ("8,16" if args.quick else "256,1024")).split(",")]
    args.options = (args.options or ",".join(QUICK_OPTIONS if args.quick else OPTIONS)).split(",")
    args.libraries = args.libraries.split(",")
    args.repeats = args.repeats or (2 if args.quick else 10)
    args.warmup = 1 if args.quick else args.warmup
    unknown = [name for name in args.options if name not in OPTIONS]
    if unknown:
        parser.error(f"unknown options {unknown}; choose from {', '.join(OPTIONS)}")
    return args


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"CPU ({torch.get_num_threads()} threads), torch {torch.__version__}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; prints the table; returns (and with ``--out`` writes) the results."""
    quiet_third_party()
    args = parse_args(argv)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: no CUDA device here; run with --quick (CPU) or on a GPU machine")
    base = (tiny_model() if args.quick else load_asset("fmnist_diffusion.pt")).to(args.device).eval()
    base.requires_grad_(False)
    model_name = "tiny UNet 8x8" if args.quick else "shipped fmnist UNet 28x28"
    checks = check_libraries(base, args.device, args.steps)
    header = f"{model_name}, {describe_device(args.device)}, DPM-Solver++(2M) x {args.steps} steps"
    print(f"{header}\nchecks: {checks}\n\n{HEADER}", flush=True)
    rows = []
    for option in args.options:
        for batch in args.batches:
            rows += measure(base, option, batch, args.device, args)
    result = {"setup": header, "checks": checks, "rows": rows, "command": " ".join(sys.argv)}
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        table = "\n".join([HEADER, *map(format_row, rows)])
        (out / "gpu_throughput.md").write_text(f"{header}\n\n{table}\n")
        (out / "gpu_throughput.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
