"""``sample.py trainer=ddp`` gives the ``samples.npz`` of one process, on a trained network.

tests/test_ecosystem.py checks two CPU processes on an analytic mixture with a stochastic sampler;
this checks the same on the shipped UNet (a convolutional network, whose batched kernels are where a
different batch composition would show): every rank samples the very batches one process samples,
so the files are byte for byte the same. ``trainer=ddp`` (GPUs) runs this code path with
``accelerator=gpu``; docs/ecosystem.md has the GPU command.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ["model=unet_fmnist", "sampler=dpmpp_2m", "sampler.steps=2", "seeds=0-5", "batch_size=2"]


def test_two_cpu_processes_write_the_single_process_samples_npz(tmp_path):
    from fastsample.jobs.sampling import generate

    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    command = [sys.executable, str(ROOT / "sample.py"), *SETTINGS, "class_labels=cycle", "trainer=ddp_cpu"]
    result = subprocess.run(
        [*command, f"hydra.run.dir={tmp_path / 'ddp'}"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("sample", [*SETTINGS, "class_labels=cycle", f"output_dir={tmp_path / 'one'}"])
    generate(cfg)
    run = json.loads((tmp_path / "ddp" / "run.json").read_text())
    assert run["world_size"] == 2 and run["batches_per_rank"] == [2, 1]
    ddp, one = (
        (tmp_path / "ddp" / "samples.npz").read_bytes(),
        (tmp_path / "one" / "samples.npz").read_bytes(),
    )
    assert ddp == one  # images, labels and seeds, byte for byte (fixed .npz member timestamps)
