"""The shipped schedules (fastsample/assets/schedules) as a table: what each was searched for and how
it scored, read from the files' own provenance (``python bench/shipped_schedules.py``).

GITS / AYS files carry the RMS to the teacher of the configured schedule (Karras) and of the searched
one on held-out seeds; ``quality`` files carry the validation FID of both.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fastsample.diffusion.schedules import load_schedule_file

ASSETS = Path(__file__).resolve().parents[1] / "fastsample" / "assets" / "schedules"


def row(path: Path) -> tuple:
    content = load_schedule_file(path)
    metrics = content["metrics"]
    held = metrics.get("holdout") or metrics.get("validation") or metrics["search"]
    score = "fid" if "fid" in held else "rms"
    what = "validation FID" if score == "fid" else "held-out RMS to the teacher"
    ratio = held[score] / held[f"baseline_{score}"]
    sigmas = ", ".join(f"{s:.3g}" for s in content["sigmas"])
    return (
        content["sampler"],
        content["nfe"],
        content["method"],
        what,
        held[f"baseline_{score}"],
        held[score],
        ratio,
        sigmas,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=str(ASSETS))
    args = parser.parse_args()
    rows = sorted(row(path) for path in Path(args.dir).glob("schedule-*.yaml"))
    print("| sampler | NFE | method | measure | Karras | searched | ratio | sigmas |")
    print("|---|---:|---|---|---:|---:|---:|---|")
    for sampler, nfe, method, what, base, found, ratio, sigmas in rows:
        print(
            f"| {sampler} | {nfe} | {method} | {what} | {base:.4f} | {found:.4f} | {ratio:.2f} | {sigmas} |"
        )


if __name__ == "__main__":
    main()
