"""Train the foreign benchmark models: class-conditional diffusers UNet2DModels on Fashion-MNIST.

The recipe is fastsample/jobs/foreign_models.py (diffusers' own training objective: add_noise at
uniform integer timesteps, MSE on the prediction target, AdamW, EMA). Each model becomes a
``save_pretrained`` pipeline folder ``<out>/<name>`` (unet/ + scheduler/) that
``model=diffusers model.path=<out>/<name>`` loads; rerunning resumes from ``<out>/<name>/checkpoint.pt``.

    python bench/train_foreign_models.py                         # eps_linear, v_cosine -> outputs/foreign
    python bench/train_foreign_models.py v_cosine --threads 2
    python bench/train_foreign_models.py --quick --out /tmp/foreign   # tiny nets, a few steps
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastsample.jobs.foreign_models import main  # noqa: E402
from fastsample.utils.errors import run_cli  # noqa: E402

if __name__ == "__main__":
    run_cli(main)
