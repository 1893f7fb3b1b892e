"""Few-step sampling on the foreign benchmark models: diffusers' schedulers at their defaults per NFE.

The engine is fastsample/jobs/foreign_benchmark.py. Per model (diffusers folders from
``make foreign-models``) and NFE budget (4, 5, 6, 8, 10, 20), every diffusers scheduler with its default
settings (DDIM, PNDM, Euler, Heun, DPM++2M/3M, DPM++2M Karras, UniPC, UniPC Karras, DEIS) runs through
``sampler=diffusers`` on the same seeds and labels, beside converged runs (NFE >= 200), scored by FID
in the shipped classifier's features and in a held-out random CNN's (seed 0) on the test split.

    python bench/foreign_models.py                                    # both models, 2000 samples
    python bench/foreign_models.py --models eps_linear=outputs/foreign/eps_linear --num-samples 1000
    python bench/foreign_models.py --models unet_fmnist               # any conf/model config
    python bench/foreign_models.py --samplers dpmpp_2m@vp,unipc       # + fastsample rows
    python bench/foreign_models.py --row 'tuned:sampler=tuned;sampler.path=DIR/tuned-nfe{nfe}.yaml'
    python bench/foreign_models.py --report                           # tables of earlier results
    python bench/foreign_models.py --quick --models q=/tmp/foreign/eps_linear   # seconds (tests)

Writes ``<out>/<model>/rows.csv`` after every row (a rerun skips rows already there),
``<out>/foreign_models.csv`` and ``.md``, and prints the markdown tables.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastsample.jobs.foreign_benchmark import TUNED, main  # noqa: E402
from fastsample.utils.errors import run_cli  # noqa: E402

#: fastsample rows beside diffusers' (docs/tuning.md, "Tuner"). ``--hand-picked`` adds fixed fastsample
#: configurations chosen without tuning (the table's "fastsample best hand-picked" is the best of them per
#: budget); ``--tuned RUN_DIR`` adds the sampler ``sample.py mode=tune`` wrote there (``tuned-nfe<N>.yaml``
#: per budget, so give ``--nfe`` the tuned budgets):
#:     python bench/foreign_models.py --models eps_linear=outputs/foreign/eps_linear --nfe 5,10 \
#:         --diffusers none --no-references --hand-picked --tuned outputs/tune/eps_linear
HAND_PICKED = (
    "hand dpmpp_2m karras:sampler=dpmpp_2m",
    "hand dpmpp_2m vp:sampler=dpmpp_2m;sampler.schedule.kind=vp",
    "hand unipc loglinear:sampler=unipc;sampler.schedule.kind=loglinear",
    "hand unipc trailing:sampler=unipc;sampler.schedule.kind=time_uniform;sampler.schedule.spacing=trailing",
)


def fastsample_rows(argv: list[str]) -> list[str]:
    """``--hand-picked`` and ``--tuned RUN_DIR`` written as the engine's ``--row`` options."""
    expanded, items = [], iter(argv)
    for item in items:
        if item == "--hand-picked":
            expanded += [arg for row in HAND_PICKED for arg in ("--row", row)]
        elif item == "--tuned":
            path = f"{next(items, '.')}/tuned-nfe{{nfe}}.yaml"
            expanded += ["--row", f"{TUNED}:sampler=tuned;sampler.path={path};sampler.steps=null"]
        else:
            expanded.append(item)
    return expanded


if __name__ == "__main__":
    run_cli(lambda: main(fastsample_rows(sys.argv[1:])))
