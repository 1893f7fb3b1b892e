"""``precision=float64`` end to end: the noise, the solver state and the model run in float64 on every
kind of model (mixtures, trained networks from a bundle, a callable, a guidance classifier), through
``sample.py``'s setup and through the paths that sample a built model without it (the Evaluator)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from error_catalog import make_bundles
from hydra import compose, initialize_config_dir

from fastsample.jobs.setup import plan
from fastsample.models.gmm import GaussianMixture
from fastsample.samplers import Sampler
from fastsample.samplers.generation import generate_batch
from fastsample.utils.seeding import SeedNoise

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "gmm_toy": ["model=gmm_toy"],
    "bundle": ["model=from_checkpoint", "model.path={tmp}/model.pt"],
    "callable": [
        "model=callable",
        "model.fn=fastsample.models.gmm.GaussianMixture.toy",
        "model.kwargs={{name: ring}}",
    ],
}


def setup_for(tmp_path: Path, precision: str, *overrides: str):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "sample",
            overrides=[
                f"output_dir={tmp_path}/out",
                "device=cpu",
                "seeds=0-3",
                "sampler.steps=4",
                f"precision={precision}",
                *(item.format(tmp=tmp_path) for item in overrides),
            ],
        )
    return plan(cfg)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_float64_runs_noise_state_and_model_in_float64(tmp_path: Path, model: str) -> None:
    if model == "bundle":
        make_bundles(tmp_path)
    single = setup_for(tmp_path, "float32", *MODELS[model])
    double = setup_for(tmp_path, "float64", *MODELS[model])
    assert all(p.dtype == torch.float64 for p in double.model.parameters())
    assert all(b.dtype == torch.float64 for b in double.model.buffers() if b.is_floating_point())
    with torch.no_grad():
        low, high = single.generate(single.seeds), double.generate(double.seeds)
    assert low.dtype == torch.float32 and high.dtype == torch.float64
    assert not torch.equal(high.float(), low)  # really computed in float64, not float32 cast up
    torch.testing.assert_close(high.float(), low, atol=1e-3, rtol=0)
    # the Evaluator / FID callback path samples a built model without the setup: same dtype, same samples
    again = generate_batch(
        double.sampler, double.model, double.seeds, double.shape, None, None, double.device
    )
    assert torch.equal(again, high)


def test_float64_mixture_matches_the_exact_float64_solution(tmp_path: Path) -> None:
    setup = setup_for(tmp_path, "float64", "model=gmm_toy", "sampler=heun")
    with torch.no_grad():
        samples = setup.generate(setup.seeds)
    mixture = GaussianMixture.toy("ring", std=0.1, sigma_min=0.002, sigma_max=80.0)
    noise = SeedNoise(setup.seeds).randn(setup.shape, dtype=torch.float64)
    expected = Sampler("heun", 4).sample(mixture, noise)
    assert torch.equal(samples, expected)


def test_float64_with_a_guidance_classifier(tmp_path: Path) -> None:
    """A guidance task's network follows the run's precision (it used to stay float32 and fail)."""
    setup = setup_for(tmp_path, "float64", "model=unet_fmnist", "guidance=classifier", "sampler.steps=2")
    with torch.no_grad():
        samples = setup.generate(setup.seeds[:2])
    assert samples.dtype == torch.float64 and bool(torch.isfinite(samples).all())
