"""Metric speed: domain-classifier features + FID (and KID, precision / recall) for 10k 28x28 images.

The extractor comes from conf/evaluate.yaml's ``metrics`` group (default: the shipped Fashion-MNIST
classifier), the images from the Fashion-MNIST test split (random pixels with ``--random-images``: the
speed does not depend on the content). Target: features + FID of 10k images in < 30 s on 2 CPU cores.

    python bench/metrics_speed.py [--num-images 10000] [--batch-size 500] [--device cpu]
    python bench/metrics_speed.py features.path=/path/to/classifier.pt   # any evaluate.yaml override
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastsample.jobs.evaluation import build_evaluator, reference_datamodule  # noqa: E402
from fastsample.metrics import frechet_distance, kid, precision_recall  # noqa: E402
from fastsample.utils.device import resolve_device  # noqa: E402
from fastsample.utils.errors import run_cli  # noqa: E402
from fastsample.utils.images import to_uint8  # noqa: E402

TARGET_S = 30.0


def load_images(cfg, count: int, random: bool) -> np.ndarray:
    """``count`` uint8 (N, 28, 28, 1) images: the dataset's test split, or uniform random pixels."""
    if random:
        return np.random.default_rng(0).integers(0, 256, (count, 28, 28, 1), dtype=np.uint8)
    dataset = reference_datamodule(cfg).dataset("test")
    images = torch.stack([dataset[i][0] for i in range(min(count, len(dataset)))])
    pixels = to_uint8(images)
    repeats = -(-count // len(pixels))
    return np.concatenate([pixels] * repeats)[:count]


def matmul_gflops(size: int = 1024, repeats: int = 10) -> float:
    """float32 matmul throughput of this machine right now (to compare runs on busy machines)."""
    a = torch.randn(size, size)
    a @ a
    start = time.perf_counter()
    for _ in range(repeats):
        a @ a
    return repeats * 2 * size**3 / (time.perf_counter() - start) / 1e9


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def run(args: argparse.Namespace, overrides: list[str]) -> list[tuple[str, float, int]]:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "evaluate",
            overrides=[
                f"features={args.metrics}",
                f"batch_size={args.batch_size}",
                f"device={args.device}",
                *overrides,
            ],
        )
    images = load_images(cfg, args.num_images, args.random_images)
    device = resolve_device(cfg.device)
    evaluator, load_s = timed(lambda: build_evaluator(cfg, device))
    evaluator.keep_features = args.num_images
    evaluator.extractor(images[:2])  # warm-up: lazy weights, first-call allocations
    stats, features_s = timed(lambda: evaluator.features(images))
    mu, sigma = stats.mu, stats.sigma
    half = len(images) // 2
    other = evaluator.features(images[half:])  # a second set to compare with (not timed)
    _, fid_s = timed(lambda: frechet_distance(mu, sigma, other.mu, other.sigma))
    _, kid_s = timed(lambda: kid(stats.features, other.features, subsets=100, subset_size=1000))
    _, pr_s = timed(lambda: precision_recall(other.features, stats.features, k=3))
    n = len(images)
    rows = [
        ("load extractor", load_s, 0),
        (f"features + streaming mean / covariance ({stats.dim}-d)", features_s, n),
        ("FID (Frechet distance of the statistics)", fid_s, n),
        ("features + FID", features_s + fid_s, n),
        ("KID (100 subsets of 1000)", kid_s, n),
        (f"precision / recall (k=3, {n} vs {n - half})", pr_s, n),
    ]
    print(
        f"extractor {evaluator.extractor.name} on {device}, {torch.get_num_threads()} threads, "
        f"{n} images {images.shape[1]}x{images.shape[2]}x{images.shape[3]}, batch {args.batch_size}; "
        f"machine: {matmul_gflops():.0f} GFLOP/s float32 matmul"
    )
    print()
    print("| stage | seconds | images / s |")
    print("|---|---:|---:|")
    for name, seconds, count in rows:
        rate = f"{count / seconds:,.0f}" if count and seconds > 0 else "-"
        print(f"| {name} | {seconds:.2f} | {rate} |")
    total = features_s + fid_s
    verdict = "meets" if total < TARGET_S else "misses"
    print(f"\nfeatures + FID: {total:.1f} s for {n} images ({verdict} the < {TARGET_S:.0f} s target)")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--metrics", default="classifier", help="conf/features config")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--random-images", action="store_true", help="random pixels instead of the test split"
    )
    args, overrides = parser.parse_known_args()
    run_cli(lambda: run(args, overrides))


if __name__ == "__main__":
    main()
