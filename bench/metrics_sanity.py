"""Metric sanity on Fashion-MNIST with the shipped classifier's features: the numbers in docs/evaluation.md.

Reference: the statistics of ``--count`` training images. Scored against it: a disjoint training subset,
the test split, the test split with growing Gaussian noise and blur, the reference set itself, and
uniform noise; the Inception Score (from the classifier's logits) of real test images and of noise.

    python bench/metrics_sanity.py [--count 5000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torchvision.transforms.functional as TF

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastsample.jobs.evaluation import reference_datamodule  # noqa: E402
from fastsample.lit.loading import classifier_features  # noqa: E402
from fastsample.metrics import frechet_distance  # noqa: E402
from fastsample.metrics.evaluator import Evaluator  # noqa: E402
from fastsample.utils.errors import run_cli  # noqa: E402

NOISE_STDS = (0.05, 0.1, 0.2, 0.4)  # in the [-1, 1] pixel range
BLUR_SIGMAS = (0.5, 1.0, 1.5, 2.0)  # pixels


def split_images(cfg, split: str, start: int, count: int) -> torch.Tensor:
    """``count`` float images (N, 1, 28, 28) in [-1, 1] from a split, starting at ``start``."""
    dataset = reference_datamodule(cfg).dataset(split)
    return torch.stack([dataset[i][0] for i in range(start, start + count)])


def noisy(images: torch.Tensor, std: float) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return (images + std * torch.randn(images.shape, generator=generator)).clamp(-1, 1)


def blurred(images: torch.Tensor, sigma: float) -> torch.Tensor:
    return TF.gaussian_blur(images, kernel_size=2 * round(3 * sigma) + 1, sigma=sigma)


def rows(evaluator: Evaluator, train: torch.Tensor, test: torch.Tensor) -> list[tuple[str, dict]]:
    """(description, scores) for every comparison of the table."""
    reference = evaluator.reference
    uniform = torch.rand(test.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
    out = [
        ("training subset (disjoint)", evaluator.score_images(train)),
        ("test split", evaluator.score_images(test)),
    ]
    out += [(f"test + Gaussian noise std {s}", evaluator.score_images(noisy(test, s))) for s in NOISE_STDS]
    out += [(f"test blurred, sigma {s} px", evaluator.score_images(blurred(test, s))) for s in BLUR_SIGMAS]
    out.append(("uniform noise", evaluator.score_images(uniform)))
    itself = {"fid": frechet_distance(reference.mu, reference.sigma, reference.mu, reference.sigma)}
    out.append(("the reference set itself", itself))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=5000, help="images per set")
    args = parser.parse_args()
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("evaluate", overrides=["dataset=fashion_mnist"])
    started = time.perf_counter()
    reference_images = split_images(cfg, "train", 0, args.count)
    evaluator = Evaluator(classifier_features(), batch_size=500, keep_features=args.count)
    evaluator.reference = evaluator.build_reference(reference_images)
    train = split_images(cfg, "train", args.count, args.count)
    test = split_images(cfg, "test", 0, args.count)
    print(f"reference: {args.count} Fashion-MNIST training images; each set {args.count} images\n")
    print("| set | FID | KID | precision | recall | IS |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, scores in rows(evaluator, train, test):
        cells = [scores.get(key) for key in ("fid", "kid_mean", "precision", "recall", "is_mean")]
        print(f"| {name} | " + " | ".join("-" if v is None else f"{v:.4g}" for v in cells) + " |")
    print(f"\n{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    run_cli(main)
