"""Guidance tasks: classifier guidance (exact mixture posterior, noise-conditioned classifiers),
classifier-free guidance, inverse problems (inpainting, colorization, super-resolution), bad input,
and ``sample.py guidance=... sampler=...``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from fastsample.data import build_dataset
from fastsample.guidance import (
    CFGDenoiser,
    ClassifierFreeGuidance,
    ClassifierGuidance,
    Colorization,
    Inpainting,
    MixturePosteriorGuidance,
    SuperResolution,
)
from fastsample.guidance.operators import DownsampleOperator, GrayscaleOperator, MaskOperator, named_mask
from fastsample.jobs.sampling import generate
from fastsample.models.classifier import NoisyClassifier
from fastsample.models.gmm import GaussianMixture
from fastsample.models.sigma_classifier import SigmaClassifier, input_convention
from fastsample.samplers import Sampler
from fastsample.utils.errors import UserError
from fastsample.utils.seeding import SeedNoise

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[1]
DIGITS = (1, 8, 8)


def noise_for(seeds, shape=DIGITS) -> torch.Tensor:
    return SeedNoise(seeds).randn(shape, dtype=torch.float64)


class PosteriorClassifier(nn.Module):
    """A ``classifier(x, sigma) -> logits`` made of the mixture's exact class posterior."""

    def __init__(self, model: GaussianMixture) -> None:
        super().__init__()
        self.model = model
        self.num_classes = model.num_classes
        self.image_shape = model.image_shape

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.model.class_log_posterior(x, sigma)


# --- classifier guidance -----------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [0.05, 0.5, 3.0, 40.0])
def test_exact_posterior_guidance_at_scale_one_is_the_conditional_model(digits_gmm, sigma) -> None:
    """Tweedie: D + sigma^2 grad log p(c | x) = E[x0 | x, c], so D - sigma g is the class-conditional
    denoiser (the sign and the sigma factor of g are right)."""
    labels = torch.tensor([0, 3, 7, 9])
    x = torch.randn(4, *DIGITS, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * (1 + sigma)
    g = MixturePosteriorGuidance(1.0).function(digits_gmm, labels)
    sigma_t = torch.tensor(sigma, dtype=torch.float64)
    guided = digits_gmm(x, sigma) - sigma * g(x, sigma_t)
    torch.testing.assert_close(guided, digits_gmm(x, sigma, class_labels=labels), rtol=1e-9, atol=1e-9)
    assert g.stats.grad_evals == 1


def test_classifier_guidance_with_a_sigma_classifier_matches_the_exact_posterior(digits_gmm) -> None:
    seeds = list(range(6))
    task = ClassifierGuidance(PosteriorClassifier(digits_gmm), scale=2.5)
    run = task.setup(digits_gmm, seeds=seeds, shape=DIGITS, dtype=torch.float64)
    exact = MixturePosteriorGuidance(2.5).setup(digits_gmm, seeds=seeds, dtype=torch.float64)
    assert torch.equal(run.labels, torch.arange(6)) and run.cond is None  # cycle targets, unconditional model
    x, sigma = torch.randn(6, *DIGITS, dtype=torch.float64), torch.tensor(0.7, dtype=torch.float64)
    torch.testing.assert_close(run.guidance(x, sigma), exact.guidance(x, sigma), rtol=1e-10, atol=1e-12)
    with_labels = ClassifierGuidance(PosteriorClassifier(digits_gmm), model_labels=True)
    assert torch.equal(with_labels.setup(digits_gmm, seeds=seeds).cond["class_labels"], torch.arange(6))


def tiny_noisy_classifier() -> SigmaClassifier:
    torch.manual_seed(0)
    net = NoisyClassifier(
        1, 10, image_size=8, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
        attention_resolutions=(), mid_attention=False, groups=8,
    )  # fmt: skip
    return SigmaClassifier(net, input_convention(noisy=True)).eval()


def test_noise_conditioned_classifier_guidance_runs_under_every_kind_of_sampler(digits_gmm) -> None:
    classifier = tiny_noisy_classifier().double()
    task = ClassifierGuidance(classifier, scale=3.0)
    seeds = list(range(4))
    run = task.setup(digits_gmm, seeds=seeds, labels=torch.tensor([1, 2, 3, 4]), dtype=torch.float64)
    g = run.guidance(noise_for(seeds), torch.tensor(1.0, dtype=torch.float64))
    assert g.shape == (4, *DIGITS) and bool(torch.isfinite(g).all()) and float(g.abs().max()) > 0
    for name in ("plms", "ddim", "ltsp", "stsp"):
        with torch.no_grad():  # the guidance takes its gradient even under no_grad
            out = Sampler(name, 6).sample(run.denoiser, noise_for(seeds), guidance=run.guidance)
        assert bool(torch.isfinite(out).all())
    assert not any(p.requires_grad for p in classifier.parameters())


def test_missing_classifier_file_names_the_setting(tmp_path) -> None:
    with pytest.raises(UserError, match="guidance.classifier="):
        ClassifierGuidance(str(tmp_path / "nope" / "classifier.pt"))


def test_classifier_for_other_images_is_refused(digits_gmm) -> None:
    with pytest.raises(UserError, match=r"guidance.classifier takes images of shape \(1, 8, 8\)"):
        ClassifierGuidance(tiny_noisy_classifier()).setup(digits_gmm, seeds=[0], shape=(1, 16, 16))


# --- classifier-free guidance -------------------------------------------------------------------------


def test_cfg_batching_equals_two_separate_passes(digits_gmm, tiny_net_factory) -> None:
    labels = torch.tensor([0, 4, 9])
    for model, dtype in ((digits_gmm, torch.float64), (tiny_net_factory(torch.float64), torch.float64)):
        x = torch.randn(3, *DIGITS, generator=torch.Generator().manual_seed(1), dtype=dtype)
        sigma = torch.full((3,), 0.8, dtype=dtype)
        null = torch.full_like(labels, model.num_classes)
        with torch.no_grad():
            conditional = model(x, sigma, class_labels=labels)
            unconditional = model(x, sigma, class_labels=null)
            guided = CFGDenoiser(model, 3.0)(x, sigma, class_labels=labels)
            scale_one = CFGDenoiser(model, 1.0)(x, sigma, class_labels=labels)
        expected = unconditional + 3.0 * (conditional - unconditional)
        torch.testing.assert_close(guided, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(scale_one, conditional, rtol=1e-12, atol=1e-12)


def test_cfg_is_one_batched_call_per_step(digits_gmm) -> None:
    from fastsample.diffusion import CountingDenoiser

    counter = CountingDenoiser(digits_gmm)
    run = ClassifierFreeGuidance(2.0).setup(counter, seeds=list(range(5)))
    Sampler("dpmpp_2m", 7).sample(run.denoiser, noise_for(range(5)), cond=run.cond)
    assert counter.calls == 7 and run.guidance is None


def test_cfg_needs_a_class_conditional_model() -> None:
    unconditional = GaussianMixture.toy("ring")
    unconditional.num_classes = None
    with pytest.raises(UserError, match="guidance=cfg needs a class-conditional model"):
        ClassifierFreeGuidance(2.0).setup(unconditional, seeds=[0, 1])


# --- inverse problems ------------------------------------------------------------------------------


def residual(task, out: torch.Tensor, y: torch.Tensor, reduce=torch.max) -> float:
    """||A(x) - y|| per sample, reduced over the batch (max by default)."""
    return float(reduce((task.operator(out) - y).flatten(1).norm(dim=1)))


@pytest.mark.parametrize("name", ["plms", "ddim", "dpmpp_2m", "ltsp", "stsp"])
@pytest.mark.parametrize(
    "task",
    [
        Inpainting(mask="center", scale=2.0, projection=True),
        SuperResolution(factor=2, scale=2.0, projection=True),
    ],
)
def test_projection_makes_samples_satisfy_the_measurement(digits_gmm, task, name) -> None:
    seeds = list(range(8))
    run = task.setup(digits_gmm, seeds=seeds, shape=DIGITS, dtype=torch.float64)
    out = Sampler(name, 12).sample(run.denoiser, noise_for(seeds), guidance=run.guidance)
    assert residual(task, out, run.measurement) < 1e-9
    unguided = Sampler("ddim", 12).sample(digits_gmm, noise_for(seeds))
    assert residual(task, unguided, run.measurement) > 0.5


@pytest.mark.parametrize("task_class", [Inpainting, SuperResolution])
def test_data_consistency_alone_pulls_samples_to_the_measurement(digits_gmm, task_class) -> None:
    seeds = list(range(8))
    task = task_class(scale=5.0, projection=False)
    run = task.setup(digits_gmm, seeds=seeds, shape=DIGITS, dtype=torch.float64)
    unguided = Sampler("ddim", 20).sample(digits_gmm, noise_for(seeds))
    for name in ("ltsp", "stsp"):
        out = Sampler(name, 20).sample(run.denoiser, noise_for(seeds), guidance=run.guidance)
        guided_residual = residual(task, out, run.measurement, torch.mean)
        assert guided_residual < 0.4 * residual(task, unguided, run.measurement, torch.mean)
    assert task.stats.grad_evals > 0 and task.stats.model_calls == task.stats.grad_evals


@pytest.fixture(scope="module")
def patches_gmm() -> GaussianMixture:
    """A mixture fitted to 8x8 RGB patches of the offline sample photos (dataset sample_patches)."""
    data = build_dataset("sample_patches", "train", resolution=8)
    images = torch.stack([data[i][0] for i in range(len(data))]).double()
    labels = torch.stack([data[i][1] for i in range(len(data))])
    return GaussianMixture.fit(
        images, labels, rank=12, components_per_class=2, sigma_min=0.02, sigma_max=80.0
    )


def test_colorization_on_rgb_patches(patches_gmm) -> None:
    seeds = list(range(6))
    task = Colorization(scale=2.0, projection=True)
    run = task.setup(patches_gmm, seeds=seeds, shape=(3, 8, 8), dtype=torch.float64)
    assert run.measurement.shape == (6, 1, 8, 8)
    out = Sampler("stsp", 15).sample(run.denoiser, noise_for(seeds, (3, 8, 8)), guidance=run.guidance)
    assert residual(task, out, run.measurement) < 1e-9
    assert float((out - run.reference).abs().mean()) < 0.5  # colours roughly right, not only the luma


def test_measurements_from_a_dataset_by_seed(digits_gmm) -> None:
    class Digits:
        def dataset(self, split):
            return build_dataset("digits", split)

    task = Inpainting(mask="left", source="dataset", data=Digits(), noise_std=0.1)
    run = task.setup(digits_gmm, seeds=[3, 5], shape=DIGITS, dtype=torch.float64)
    test_split = build_dataset("digits", "test")
    torch.testing.assert_close(run.reference[1], test_split[5][0].double())
    again = task.setup(digits_gmm, seeds=[5], shape=DIGITS, dtype=torch.float64)
    torch.testing.assert_close(again.measurement[0], run.measurement[1])  # the noise is per seed


def test_operator_pseudo_inverses() -> None:
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    for operator in (MaskOperator("random", 0.3), GrayscaleOperator(), DownsampleOperator(4)):
        y = operator(x)
        torch.testing.assert_close(operator(operator.pinv(y)), y)  # A A^+ = I on measurements
        projected = operator.project(torch.zeros_like(x), y)
        torch.testing.assert_close(operator(projected), y)
    assert float(named_mask("center", (1, 8, 8)).sum()) == 64 - 16
    assert float(named_mask("top", (1, 8, 8))[:, :4].sum()) == 0


# --- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        lambda: MixturePosteriorGuidance(-1.0),
        lambda: ClassifierFreeGuidance(-0.5),
        lambda: ClassifierGuidance(tiny_noisy_classifier(), scale=-2),
        lambda: Inpainting(scale=-1),
        lambda: Colorization(scale=-1),
        lambda: SuperResolution(scale=-1),
        lambda: MixturePosteriorGuidance(float("nan")),
    ],
)
def test_negative_scale_is_refused(build) -> None:
    with pytest.raises(UserError, match=r"guidance.scale=.* (out of range|not allowed)"):
        build()


def test_mask_of_the_wrong_size_is_refused(digits_gmm) -> None:
    task = Inpainting(mask=np.ones((4, 4)).tolist())
    with pytest.raises(UserError, match=r"guidance.mask has shape \(4, 4\) but the data is \(1, 8, 8\)"):
        task.setup(digits_gmm, seeds=[0], shape=DIGITS)
    with pytest.raises(UserError, match="only 0 .* and 1"):
        Inpainting(mask=[[0.5] * 8] * 8)
    with pytest.raises(UserError, match="guidance.mask='diagonal'"):
        Inpainting(mask="diagonal")


def test_measurement_of_the_wrong_shape_is_refused(digits_gmm) -> None:
    task = SuperResolution(factor=2)
    with pytest.raises(UserError, match=r"measurement has shape \(2, 1, 8, 8\) .* gives \(B, 1, 4, 4\)"):
        task.for_measurement(digits_gmm, torch.zeros(2, 1, 8, 8))
    with pytest.raises(UserError, match=r"measurement has shape \(2, 3, 8, 8\)"):
        Colorization().for_measurement(GaussianMixture.toy("ring"), torch.zeros(2, 3, 8, 8), shape=(3, 8, 8))


@pytest.mark.parametrize(
    ("task", "message"),
    [
        (Colorization(), r"guidance=colorize needs RGB data \(3 channels\)"),
        (SuperResolution(factor=3), "guidance.factor=3 does not divide the image size 8x8"),
        (Inpainting(source="dataset"), "guidance.source=dataset needs guidance.data"),
    ],
)
def test_task_and_model_mismatch_is_refused(digits_gmm, task, message) -> None:
    with pytest.raises(UserError, match=message):
        task.setup(digits_gmm, seeds=[0], shape=DIGITS)


def test_mixture_guidance_needs_a_mixture(tiny_net_factory) -> None:
    with pytest.raises(UserError, match="guidance=gmm_posterior needs an analytic mixture"):
        MixturePosteriorGuidance(1.0).setup(tiny_net_factory(), seeds=[0])
    with pytest.raises(UserError, match="guidance.source=model draws ground truth from an analytic mixture"):
        Inpainting(source="model").setup(tiny_net_factory(), seeds=[0])


# --- sample.py ---------------------------------------------------------------------------------------


def sample_config(tmp_path: Path, *overrides: str):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose(
            "sample",
            overrides=[
                "model=gmm_digits",
                f"model.cache_dir={tmp_path}/cache",
                f"output_dir={tmp_path}/out",
                "seeds=0-5",
                "device=cpu",
                *overrides,
            ],
        )


def test_sample_cli_with_guidance_and_a_splitting_sampler(tmp_path) -> None:
    summary = generate(sample_config(tmp_path, "guidance=gmm_posterior", "sampler=stsp", "sampler.steps=6"))
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["guidance"]["name"] == "gmm_posterior" and run["guidance"]["grad_evals"] == 2 * 6
    assert summary["sampler"] == "stsp" and summary["nfe"] == 6
    with np.load(tmp_path / "out" / "samples.npz") as data:
        assert data["labels"].tolist() == [0, 1, 2, 3, 4, 5]  # the targets (class_labels=null: cycle)


def test_sample_cli_inpainting_with_measurements_from_the_mixture(tmp_path) -> None:
    summary = generate(sample_config(tmp_path, "guidance=inpaint", "sampler=ltsp", "sampler.steps=5"))
    assert summary["guidance"]["operator"] == "inpainting" and summary["guidance"]["source"] == "auto"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["guidance=cfg", "sampler=ltsp"], "guidance=cfg is a denoiser wrapper"),
        (["sampler=stsp"], "sampler=stsp splits .* there is none"),
        (["guidance=colorize", "sampler=plms"], "guidance=colorize needs RGB data"),
        (["guidance=gmm_posterior", "guidance.scale=-3"], r"guidance.scale=-3.0 is out of range"),
    ],
)
def test_sample_cli_refuses_what_makes_no_sense(tmp_path, overrides, message) -> None:
    with pytest.raises(UserError, match=message):
        generate(sample_config(tmp_path, *overrides))
