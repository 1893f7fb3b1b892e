"""The embedded default (``make demo``): the sampler benchmark on the shipped Fashion-MNIST model.

Every sampler runs at a few step counts on the same seeds (class labels cycling through the ten
classes) with the shipped class-conditional diffusion model; samples are scored on the fly with the
shipped Fashion-MNIST classifier's features against the test split (FID, KID and how often the
classifier agrees with the requested class). Writes ``fid_vs_nfe.{md,csv,png}`` and a grid of
samples to ``outputs/demo/<time>/`` and prints where they are. Sized to finish in under 10 minutes
on 2 CPU cores; ``bench/fid_vs_nfe.py`` runs the same benchmark with any settings.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from fastsample.jobs.benchmark import ROOT, BenchSettings, fid_vs_nfe
from fastsample.jobs.sampling import generate
from fastsample.utils.errors import run_cli

DEMO = BenchSettings(
    samplers=("euler", "heun", "dpmpp_2m", "unipc", "ipndm", "dpmpp_2m_sde"),
    steps=(4, 8, 16),
    num_samples=400,
    model="unet_fmnist",
    exact=False,
)
GRID = ("dpmpp_2m", 16, 100)  # sampler, steps, seeds of the sample grid


def sample_grid(out_dir: Path) -> Path:
    """A 10x10 grid of the shipped model (one class per column) through the ``sample.py`` job."""
    name, steps, seeds = GRID
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "sample",
            overrides=[
                f"model={DEMO.model}",
                f"sampler={name}",
                f"sampler.steps={steps}",
                f"seeds=0-{seeds - 1}",
                "class_labels=cycle",
                f"output_dir={out_dir}",
                f"grid_size={seeds}",
            ],
        )
    generate(cfg)
    return out_dir / "grid.png"


def main(out_dir: str | None = None) -> None:
    out = Path(out_dir or time.strftime("outputs/demo/%Y-%m-%d_%H-%M-%S"))
    start = time.perf_counter()
    settings = BenchSettings(**{**DEMO.__dict__, "out": str(out)})
    run_cli(lambda: fid_vs_nfe(settings, ["class_labels=cycle"]))
    grid = run_cli(lambda: sample_grid(out / "samples"))
    print(f"sample grid: {grid}")
    print(f"demo finished in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
