"""Peak memory of sample.py against the number of samples: it should stay flat (shards, streamed merge).

Each count runs ``sample.py`` in a fresh child process and reads that child's peak resident set size
from the kernel (``os.wait4``'s ``ru_maxrss``), so nothing of this script is counted. The model is
the analytic mixture of sklearn's 8x8 digits (``model=gmm_digits``: uint8 images, grid, labels, the
full output path) fitted once beforehand, so the fit is in neither measurement.

    python bench/sampling_memory.py [--counts 16,5000,50000] [--batch-size 500] [--steps 10]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_sample(args: list[str], log: Path) -> tuple[int, float, float]:
    """Run ``sample.py *args``; returns (exit code, peak RSS in MiB, wall seconds)."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    start = time.perf_counter()
    with open(log, "w") as handle:
        process = subprocess.Popen(
            [sys.executable, "sample.py", *args], cwd=ROOT, env=env, stdout=handle, stderr=handle
        )
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, usage.ru_maxrss / 1024, time.perf_counter() - start  # Linux: KiB


def measure(count: int, common: list[str], folder: Path) -> dict[str, float]:
    out = folder / f"n{count}"
    code, peak, wall = run_sample([*common, f"seeds=0-{count - 1}", f"hydra.run.dir={out}"], folder / "log")
    if code != 0:
        raise SystemExit(f"sample.py failed for {count} samples:\n{(folder / 'log').read_text()[-3000:]}")
    shards = list((out / "shards").glob("*.npz"))
    return {
        "samples": count,
        "shards": len(shards),
        "peak_rss_mib": round(peak, 1),
        "wall_s": round(wall, 1),
        "samples_npz_mib": round((out / "samples.npz").stat().st_size / 2**20, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="16,5000,50000")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        common = [
            "model=gmm_digits",
            f"model.cache_dir={folder / 'cache'}",
            "sampler=dpmpp_2m",
            f"sampler.steps={args.steps}",
            f"batch_size={args.batch_size}",
            "device=cpu",
        ]
        measure(16, common, folder)  # fits and caches the mixture
        rows = [measure(int(count), common, folder) for count in args.counts.split(",")]
    print("| samples | shards | peak RSS (MiB) | wall (s) | samples.npz (MiB) |")
    print("|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['samples']} | {row['shards']} | {row['peak_rss_mib']} | {row['wall_s']} | "
            f"{row['samples_npz_mib']} |"
        )


if __name__ == "__main__":
    main()
