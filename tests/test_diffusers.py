"""diffusers interop: diffusers UNets as denoisers, diffusers schedulers as samplers, text-to-image.

Every component is tiny, randomly initialized and saved with ``save_pretrained`` under a temporary
folder: nothing is downloaded. The references are diffusers' own code (UNet calls, scheduler loops,
``DDIMPipeline``) on the same weights and the same noise.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from fastsample.diffusion import CountingDenoiser
from fastsample.diffusion.callable_model import load_callable
from fastsample.guidance.prompt import PromptGuidance
from fastsample.jobs.sampling import generate
from fastsample.jobs.setup import build_model
from fastsample.models.diffusers_adapter import load_text_to_image, load_unet
from fastsample.models.gmm import GaussianMixture
from fastsample.samplers import Sampler
from fastsample.samplers.diffusers_scheduler import DiffusersSampler
from fastsample.samplers.generation import generate_batch
from fastsample.utils.errors import UserError
from fastsample.utils.instantiation import instantiate
from fastsample.utils.seeding import SeedNoise

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from diffusers_tiny import DDPM, SHAPE, TABLE, save_text_to_image, save_unet_pipeline, tiny_unet  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

CONF = Path(__file__).resolve().parents[1] / "conf"


# -- tiny components ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def unet_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_unet_pipeline(tmp_path_factory.mktemp("ddpm"))


@pytest.fixture(scope="module")
def class_unet_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_unet_pipeline(tmp_path_factory.mktemp("ddpm_classes"), tiny_unet(num_class_embeds=3))


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_text_to_image(tmp_path_factory.mktemp("sd"))


@pytest.fixture(scope="module")
def sd_model(sd_folder: Path):
    return load_text_to_image(str(sd_folder))


def diffusers_loop(unet, scheduler, latents: torch.Tensor, steps: int | None, **unet_kwargs) -> torch.Tensor:
    """The diffusers pipelines' sampling loop, verbatim (``steps=None``: timesteps already set)."""
    if steps is not None:
        scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents, t)
        noise_pred = unet(model_input, t, **unet_kwargs).sample
        latents = scheduler.step(noise_pred, t, latents).prev_sample
    return latents


def compose_sample(overrides: list[str], tmp_path: Path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            "sample",
            overrides=[f"paths.output_dir={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}", *overrides],
        )


# -- the UNet adapter -----------------------------------------------------------------------------
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_adapter_denoises_as_the_unet_predicts(
    unet_folder: Path, tmp_path: Path, prediction_type: str
) -> None:
    """D(x, sigma) is the x0 that diffusers derives from the UNet's output at the same VP state and t."""
    root = tmp_path / prediction_type
    shutil.copytree(unet_folder / "unet", root / "unet")
    diffusers.DDPMScheduler(**DDPM, prediction_type=prediction_type).save_pretrained(root / "scheduler")
    model = load_unet(str(root)).double()
    unet = model.net.unet
    abar = diffusers.DDPMScheduler(**DDPM).alphas_cumprod.double()
    t = torch.tensor([0, 17, 500, 999])
    x_vp = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    alpha, sigma_vp = abar[t].sqrt().view(-1, 1, 1, 1), (1 - abar[t]).sqrt().view(-1, 1, 1, 1)
    with torch.no_grad():
        out = unet(x_vp, t).sample
        sigma = (sigma_vp / alpha).flatten()
        denoised = model(x_vp / alpha, sigma)
    if prediction_type == "epsilon":
        reference = (x_vp - sigma_vp * out) / alpha
        eps = (x_vp / alpha - denoised) / sigma.view(-1, 1, 1, 1)
        torch.testing.assert_close(eps, out, rtol=0, atol=1e-9)  # our eps is the UNet's own output
    elif prediction_type == "v_prediction":
        reference = alpha * x_vp - sigma_vp * out
    else:
        reference = out
    torch.testing.assert_close(denoised, reference, rtol=0, atol=1e-9)
    assert model.image_shape == SHAPE and model.num_classes is None
    assert (
        model.identity()["prediction"]
        == {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}[prediction_type]
    )


def noise_for(seeds: list[int], dtype=torch.float32) -> torch.Tensor:
    return SeedNoise(seeds).randn(SHAPE, dtype=dtype)


def float64_scheduler(cls: type, steps: int, **config: object):
    """A diffusers scheduler computing in float64 with ``steps`` set: its float32 table promoted (our
    adapter's table is those float32 values too), so the comparison sees the solvers' arithmetic, not
    float32 rounding. Schedulers that keep a sigma per step round it to float32: recompute it."""
    scheduler = cls(**config)
    scheduler.alphas_cumprod = abar = scheduler.alphas_cumprod.double()
    scheduler.set_timesteps(steps)
    if hasattr(scheduler, "sigmas"):
        sigmas = ((1 - abar) / abar).sqrt()[scheduler.timesteps]
        scheduler.sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    return scheduler


@pytest.mark.parametrize(
    ("ours", "scheduler", "spacing", "rtol"),
    [
        ("ddim", "DDIMScheduler", "leading", 1e-10),
        # DPMSolverMultistepScheduler.step rounds the state to float32 ("upcast") at every step
        ("dpmpp_2m", "DPMSolverMultistepScheduler", "trailing", 1e-6),
    ],
)
def test_our_solvers_match_diffusers_schedulers(
    unet_folder: Path, ours: str, scheduler: str, spacing: str, rtol: float
) -> None:
    """sampler=ddim / dpmpp_2m on the model's timesteps (schedule time_uniform with the scheduler's
    spacing) equal DDIMScheduler / DPMSolverMultistepScheduler from the same noise (float64)."""
    model = load_unet(str(unet_folder)).double()
    config = {**DDPM, "set_alpha_to_one": True} if scheduler == "DDIMScheduler" else TABLE
    steps, noise = 6, noise_for([0, 1, 2], torch.float64)
    reference = float64_scheduler(getattr(diffusers, scheduler), steps, **config, timestep_spacing=spacing)
    sampler = Sampler(ours, steps, schedule={"kind": "time_uniform", "spacing": spacing})
    torch.testing.assert_close(sampler.sigmas(model)[:-1], model.schedule.sigmas[reference.timesteps])
    start = (
        noise * (1 - reference.alphas_cumprod[reference.timesteps[0]]).sqrt()
    )  # sigma_0 noise, in VP space
    with torch.no_grad():
        expected = diffusers_loop(model.net.unet, reference, start, None)
        result = sampler.sample(model, noise)
    torch.testing.assert_close(result, expected, rtol=rtol, atol=1e-10)


# -- sampler=diffusers ----------------------------------------------------------------------------
def test_diffusers_sampler_reproduces_the_ddim_pipeline(unet_folder: Path) -> None:
    """DDIMPipeline and sampler=diffusers on our adapter: same per-seed noise, same images."""
    model = load_unet(str(unet_folder))
    seeds, steps = [5, 6, 7], 4
    pipeline = diffusers.DDIMPipeline(model.net.unet, diffusers.DDIMScheduler(**DDPM))
    pipeline.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    expected = pipeline(len(seeds), generators, num_inference_steps=steps, output_type="pt").images
    sampler = DiffusersSampler("DDIMScheduler", steps)
    counter = CountingDenoiser(model)
    with torch.no_grad():
        ours = sampler.sample(counter, noise_for(seeds), generator=SeedNoise(seeds))
    torch.testing.assert_close((ours / 2 + 0.5).clamp(0, 1), expected, rtol=0, atol=1e-5)
    assert counter.calls == sampler.nfe == steps


@pytest.mark.parametrize(
    ("scheduler", "steps", "config"),
    [
        ("EulerDiscreteScheduler", 7, {}),  # sigma-space state, fractional timesteps
        ("DPMSolverMultistepScheduler", 5, {"use_karras_sigmas": True}),
        ("HeunDiscreteScheduler", 4, {}),  # two calls per step but the last
        ("UniPCMultistepScheduler", 5, {}),
    ],
)
def test_diffusers_sampler_reproduces_the_pipeline_loop(
    class_unet_folder: Path, scheduler: str, steps: int, config: dict
) -> None:
    """Any scheduler's loop on our denoiser equals the pipeline loop on the UNet (class-conditional).

    Float64 states, so only the mapping's own rounding is left (both loops use the same float32 table).
    """
    model = load_unet(str(class_unet_folder)).double()
    seeds, labels = [0, 1, 2, 3], torch.tensor([0, 1, 2, 0])
    reference_scheduler = getattr(diffusers, scheduler).from_config({**model.scheduler_config, **config})
    reference_scheduler.set_timesteps(steps)
    noise = noise_for(seeds, torch.float64)
    sampler = DiffusersSampler(scheduler, steps, scheduler_config=config)
    counter = CountingDenoiser(model)
    with torch.no_grad():
        start = noise * reference_scheduler.init_noise_sigma
        expected = diffusers_loop(model.net.unet, reference_scheduler, start, steps, class_labels=labels)
        ours = sampler.sample(counter, noise, cond={"class_labels": labels})
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-9)
    assert counter.calls == sampler.nfe == len(reference_scheduler.timesteps)
    assert sampler.nfe == (2 * steps - 1 if scheduler == "HeunDiscreteScheduler" else steps)
    assert model.num_classes == 3


def test_diffusers_sampler_on_a_continuous_model() -> None:
    """An EDM-space model runs on diffusers' default linear table: DPM-Solver++ on the trailing timesteps
    equals our dpmpp_2m there (up to the start, noise * sqrt(1 + sigma^2) instead of sigma * noise)."""
    mixture = GaussianMixture.toy("ring")
    seeds = list(range(16))
    noise = SeedNoise(seeds).randn((2,), dtype=torch.float64)
    sampler = DiffusersSampler(
        "DPMSolverMultistepScheduler", 10, scheduler_config={"timestep_spacing": "trailing"}
    )
    ours = Sampler("dpmpp_2m", 10, schedule={"kind": "time_uniform", "spacing": "trailing"})
    torch.testing.assert_close(sampler.sigmas(mixture), ours.sigmas(mixture), rtol=1e-5, atol=0)
    counter = CountingDenoiser(mixture)
    with torch.no_grad():
        theirs = sampler.sample(counter, noise)
        expected = ours.sample(mixture, noise)
    assert counter.calls == sampler.nfe == 10
    torch.testing.assert_close(theirs, expected, rtol=0, atol=1e-3)


def test_stochastic_scheduler_draws_per_seed_noise() -> None:
    """DDPMScheduler gets one generator per seed: a sample does not depend on its batch."""
    mixture = GaussianMixture.toy("ring")
    sampler = DiffusersSampler("DDPMScheduler", 6)
    assert sampler.spec.stochastic

    def run(seeds: list[int]) -> torch.Tensor:
        noise = SeedNoise(seeds).randn((2,), dtype=torch.float64)
        return sampler.sample(mixture, noise, generator=SeedNoise(seeds))

    together = run([0, 1, 2, 3])
    torch.testing.assert_close(torch.cat([run([0, 1]), run([2, 3])]), together, rtol=0, atol=1e-12)
    shifted = sampler.sample(
        mixture, SeedNoise([0]).randn((2,), dtype=torch.float64), generator=SeedNoise([9])
    )
    assert float((shifted - together[:1]).abs().max()) > 1e-3  # the step noise really comes from the seed


def test_sample_cli_with_diffusers_model_and_sampler(class_unet_folder: Path, tmp_path: Path) -> None:
    """sample.py: model=diffusers + sampler=diffusers, class labels cycling; run.json counts the NFE."""
    cfg = compose_sample(
        [
            "model=diffusers",
            f"model.path={class_unet_folder}",
            "sampler=diffusers",
            "sampler.scheduler=DPMSolverMultistepScheduler",
            "sampler.steps=3",
            "+sampler.scheduler_config.use_karras_sigmas=true",
            "seeds=0-3",
            "class_labels=cycle",
            f"output_dir={tmp_path / 'out'}",
        ],
        tmp_path,
    )
    summary = generate(cfg)
    assert summary["sampler"] == "diffusers" and summary["nfe"] == 3
    assert summary["knobs"]["scheduler"] == "DPMSolverMultistepScheduler"
    with np.load(tmp_path / "out" / "samples.npz") as data:
        assert data["images"].shape == (4, 8, 8, 3) and data["labels"].tolist() == [0, 1, 2, 0]


# -- text to image --------------------------------------------------------------------------------
def test_text_to_image_with_sample_cli(sd_folder: Path, tmp_path: Path) -> None:
    """sample.py: prompts per seed, CFG, our sampler in latent space, images decoded by the VAE."""
    cfg = compose_sample(
        [
            "model=diffusers_t2i",
            f"model.path={sd_folder}",
            "guidance=prompt",
            "guidance.prompts=[a cat,a dog]",
            "guidance.scale=3.0",
            "sampler=dpmpp_2m",
            "sampler.steps=3",
            "seeds=0-3",
            f"output_dir={tmp_path / 'out'}",
        ],
        tmp_path,
    )
    summary = generate(cfg)
    assert summary["guidance"]["prompts"] == ["a cat", "a dog"] and summary["nfe"] == 3
    with np.load(tmp_path / "out" / "samples.npz") as data:
        images, labels = data["images"], data["labels"]
    assert images.shape == (4, 16, 16, 3) and images.dtype == np.uint8
    assert labels.tolist() == [0, 1, 0, 1]  # the prompt index of each seed
    assert (tmp_path / "out" / "grid.png").is_file()


@pytest.mark.parametrize("name", ["dpmpp_2m", "heun", "restart"])
def test_text_to_image_follows_the_prompt(sd_model, name: str) -> None:
    """Same prompt and seed: the same image; another prompt, same seed: another image. NFE counted."""
    guidance = PromptGuidance(["a red fox", "a lighthouse"], scale=4.0)
    sampler = Sampler(name, 3)

    def images(labels: list[int], model=sd_model) -> torch.Tensor:
        with torch.no_grad():
            return generate_batch(
                sampler, model, [7, 7], sd_model.image_shape, torch.tensor(labels), guidance, "cpu"
            )

    first = images([0, 1])
    assert first.shape == (2, 3, 16, 16) and float(first.abs().max()) <= 1
    assert float((first[0] - first[1]).abs().max()) > 1e-3  # the prompt changes the image
    torch.testing.assert_close(images([0, 0])[1], first[0], rtol=0, atol=1e-6)  # prompt + seed fix it
    counter = CountingDenoiser(sd_model)
    latents = images([0, 1], model=counter)
    assert latents.shape == (2, *sd_model.image_shape)  # counting hides the decoder: latents come back
    assert counter.calls == sampler.nfe  # one batched call (prompt + negative) per model evaluation


def test_text_to_image_without_prompt_is_the_empty_prompt(sd_model) -> None:
    x = torch.randn(2, *sd_model.image_shape, generator=torch.Generator().manual_seed(0))
    empty = sd_model.encode_prompts(["", ""])
    with torch.no_grad():
        torch.testing.assert_close(sd_model(x, 2.0), sd_model(x, 2.0, encoder_hidden_states=empty))
    assert sd_model.sigma_max == pytest.approx(14.6146, rel=1e-4)  # SD's scaled_linear table


def test_diffusers_sampler_on_text_to_image(sd_model) -> None:
    """The folder's own scheduler (PNDM, skip_prk_steps) runs with CFG; NFE follows its config."""
    sampler = DiffusersSampler("PNDMScheduler", 4)
    guidance = PromptGuidance(["a cat"], scale=2.0)
    counter = CountingDenoiser(sd_model)
    with torch.no_grad():
        latents = generate_batch(sampler, counter, [0, 1], sd_model.image_shape, None, guidance, "cpu")
    assert latents.shape == (2, *sd_model.image_shape) and bool(torch.isfinite(latents).all())
    assert counter.calls == sampler.nfe == 5  # PLMS visits the first timestep twice


# -- callables ------------------------------------------------------------------------------------
def test_callable_model_from_a_dotted_path(tmp_path: Path) -> None:
    cfg = compose_sample(
        ["model=callable", "model.fn=fastsample.models.gmm.GaussianMixture.toy", "model.kwargs={name: grid}"],
        tmp_path,
    )
    model = build_model(cfg, torch.device("cpu"))
    mixture = GaussianMixture.toy("grid")
    noise = SeedNoise(range(8)).randn((2,), dtype=torch.float64)
    sampler = Sampler("dpmpp_2m", 6)
    torch.testing.assert_close(sampler.sample(model, noise), sampler.sample(mixture, noise))
    as_object = load_callable(mixture, sigma_min=0.01, sigma_max=50.0)
    assert as_object.fn is mixture and sampler.sigmas(as_object)[0] == 50.0


# -- bad input ------------------------------------------------------------------------------------
def one_line_error(call, match: str) -> str:
    with pytest.raises(UserError, match=match) as info:
        call()
    assert "\n" not in str(info.value)
    return str(info.value)


def test_bad_folders_are_one_line_errors(unet_folder: Path, sd_folder: Path, tmp_path: Path) -> None:
    one_line_error(lambda: load_unet(str(tmp_path / "nowhere")), r"is not a folder")
    (tmp_path / "empty").mkdir()
    one_line_error(
        lambda: load_unet(str(tmp_path / "empty")), r"has no UNet: expected unet/config\.json or config\.json"
    )
    no_weights = tmp_path / "no_weights"
    (no_weights / "unet").mkdir(parents=True)
    shutil.copy(unet_folder / "unet" / "config.json", no_weights / "unet")
    one_line_error(lambda: load_unet(str(no_weights)), r"has config\.json but no weights")
    no_scheduler = tmp_path / "no_scheduler"
    shutil.copytree(unet_folder / "unet", no_scheduler / "unet")
    one_line_error(lambda: load_unet(str(no_scheduler)), r"has no scheduler config .* model\.scheduler=")
    assert load_unet(str(no_scheduler), scheduler=DDPM).sigma_max == pytest.approx(157.4, rel=1e-3)
    one_line_error(lambda: load_unet(str(sd_folder)), r"UNet2DConditionModel; use model=diffusers_t2i")
    partial = tmp_path / "partial"
    shutil.copytree(sd_folder / "unet", partial / "unet")
    one_line_error(lambda: load_text_to_image(str(partial)), r"missing vae/, text_encoder/, tokenizer/")


def test_unsupported_prediction_type(unet_folder: Path, tmp_path: Path) -> None:
    root = tmp_path / "flow"
    shutil.copytree(unet_folder, root)
    config = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    (root / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({**config, "prediction_type": "flow"})
    )
    message = one_line_error(lambda: load_unet(str(root)), r"prediction_type='flow' is not supported")
    assert "epsilon, v_prediction, sample" in message
    one_line_error(lambda: load_unet(str(unet_folder), prediction_type="score"), r"model\.prediction_type")


def test_bad_scheduler_settings() -> None:
    message = one_line_error(
        lambda: DiffusersSampler("FooScheduler"), r"'FooScheduler' is not a diffusers scheduler"
    )
    assert "DPMSolverMultistepScheduler" in message
    one_line_error(
        lambda: DiffusersSampler("FlowMatchEulerDiscreteScheduler"), r"runs on no discrete VP noise"
    )
    one_line_error(
        lambda: DiffusersSampler("DDIMScheduler", scheduler_config={"karras": True}),
        r"sampler\.scheduler_config\.karras is not a setting of DDIMScheduler; allowed: .*clip_sample",
    )
    one_line_error(
        lambda: DiffusersSampler("DDIMScheduler", scheduler_config={"prediction_type": "sample"}), r"is fixed"
    )
    one_line_error(
        lambda: DiffusersSampler("EulerDiscreteScheduler", step_kwargs={"eta": 1}), r"step_kwargs\.eta"
    )
    sampler = DiffusersSampler("EulerDiscreteScheduler", 4)
    mixture = GaussianMixture.toy("ring")
    karras = Sampler("euler", 4).sigmas(mixture)
    one_line_error(lambda: sampler.run(mixture, torch.zeros(2, 2), karras), r"cannot run on another grid")
    one_line_error(lambda: load_callable("fastsample.no_such_module.f"), r"model\.fn=.* cannot be imported")
    one_line_error(lambda: load_callable("math.pi"), r"gives a float, which is not callable")


def test_missing_diffusers_names_the_extra(monkeypatch: pytest.MonkeyPatch, unet_folder: Path) -> None:
    monkeypatch.setitem(sys.modules, "diffusers", None)  # what an environment without the extra sees
    one_line_error(lambda: load_unet(str(unet_folder)), r"pip install fastsample\[diffusers\]")
    one_line_error(lambda: DiffusersSampler("DDIMScheduler"), r"pip install fastsample\[diffusers\]")


def test_sampler_config_instantiates(tmp_path: Path) -> None:
    cfg = compose_sample(
        ["sampler=diffusers", "sampler.scheduler=HeunDiscreteScheduler", "sampler.steps=5"], tmp_path
    )
    sampler = instantiate(cfg.sampler)
    assert (
        isinstance(sampler, Sampler)
        and sampler.nfe == 9
        and sampler.knobs["scheduler"] == "HeunDiscreteScheduler"
    )
