"""The VAE task: network shapes, the loss terms, a fast_dev_run of ``train.py task=vae`` with its
export, bundle / checkpoint loading, and the decoder as an ES-DDPM generator prior."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from fastsample.jobs.training import train
from fastsample.lit.loading import load_vae, vae_generator
from fastsample.lit.vae import VAEModule
from fastsample.models.bundle import ASSETS_ENV
from fastsample.models.vae import ConvVAE, gaussian_nll, kl_to_standard_normal
from fastsample.samplers.es_ddpm import ESDDPMSampler
from fastsample.utils.errors import UserError
from fastsample.utils.seeding import SeedNoise

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
TINY_VAE = [
    "dataset=digits",
    "dataset.subset=128",
    "dataset.val_subset=32",
    "dataset.batch_size=32",
    "task=vae",
    "net@task.net=vae_tiny",
    "callbacks.sample_grid=null",
]


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FASTSAMPLE_DATA", str(tmp_path / "data"))
    monkeypatch.setenv(ASSETS_ENV, str(tmp_path / "assets"))


def compose_train(overrides: list[str], output_dir: Path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            "train",
            overrides=[
                f"paths.output_dir={output_dir}",
                f"paths.cache_dir={output_dir / 'cache'}",
                *overrides,
            ],
        )


@pytest.mark.parametrize(
    ("channels", "size", "widths"), [(1, 28, [16, 32]), (1, 8, [8, 16]), (3, 32, [8, 16, 32])]
)
def test_shapes(channels: int, size: int, widths: list[int]) -> None:
    vae = ConvVAE(channels, size, latent_dim=6, channels=widths, groups=4)
    x = torch.rand(3, channels, size, size) * 2 - 1
    recon, mean, log_var = vae(x)
    assert recon.shape == x.shape and mean.shape == log_var.shape == (3, 6)
    with torch.no_grad():
        images = vae.generate(torch.randn(5, 6))
    assert images.shape == (5, channels, size, size) and float(images.abs().max()) <= 1.0
    assert vae.input_shape == (channels, size, size)


def test_loss_terms() -> None:
    mean, log_var = torch.zeros(4, 3), torch.zeros(4, 3)
    assert torch.equal(kl_to_standard_normal(mean, log_var), torch.zeros(4))
    kl = kl_to_standard_normal(torch.ones(1, 2), torch.full((1, 2), math.log(4.0)))
    assert math.isclose(float(kl), 2 * 0.5 * (1 + 4 - 1 - math.log(4)), rel_tol=1e-6)
    x, recon = torch.zeros(2, 1, 2, 2), torch.full((2, 1, 2, 2), 0.5)
    nll, mse = gaussian_nll(x, recon, None)  # calibrated: variance = MSE = 0.25
    assert math.isclose(float(mse), 0.25) and torch.allclose(
        nll, torch.full((2,), 4 * (0.5 + 0.5 * math.log(0.25)))
    )
    fixed, _ = gaussian_nll(x, recon, 0.5)
    assert torch.allclose(fixed, torch.full((2,), 4 * (0.5 + math.log(0.5))))


def test_task_config_defaults_to_fashion_mnist_shape(tmp_path: Path) -> None:
    from fastsample.utils.instantiation import instantiate

    module = instantiate(compose_train(["task=vae"], tmp_path).task, _recursive_=False)
    assert isinstance(module, VAEModule) and module.image_shape == (1, 28, 28)
    cfg = compose_train(["experiment=pretrain_vae"], tmp_path)
    assert cfg.task.net.latent_dim == 32 and cfg.trainer.max_steps == 3000


def test_bad_settings() -> None:
    net = OmegaConf.load(CONF / "net/vae_tiny.yaml")
    with pytest.raises(UserError, match="task.beta"):
        VAEModule(net, beta=-1)
    with pytest.raises(UserError, match="task.decoder_std"):
        VAEModule(net, decoder_std=0.0)
    with pytest.raises(UserError, match="task.net.channels"):
        ConvVAE(channels=[])


def test_fast_dev_run_exports_a_prior(tmp_path: Path, digits_gmm) -> None:
    """train.py task=vae (fast_dev_run) -> model.pt -> generator prior -> ES-DDPM on a digits model."""
    metrics = train(compose_train([*TINY_VAE, "trainer=debug"], tmp_path))
    for name in ("train/loss", "train/mse", "train/kl", "val/loss"):
        assert np.isfinite(metrics[name])
    assert list((tmp_path / "grids").glob("vae-step-*.png"))
    vae = load_vae(tmp_path / "model.pt")
    assert isinstance(vae, ConvVAE) and vae.input_shape == (1, 8, 8)
    # the checkpoint and the bundle hold the same decoder
    from_ckpt = load_vae(tmp_path / "checkpoints" / "last.ckpt")
    z = torch.randn(3, vae.latent_dim)
    torch.testing.assert_close(from_ckpt.generate(z), vae.generate(z))

    prior = vae_generator(tmp_path / "model.pt")
    assert prior.kind == "vae" and prior.image_shape == (1, 8, 8) and prior.latent_shape == (4,)
    torch.testing.assert_close(prior.decode(z), vae.generate(z))
    sampler = ESDDPMSampler(steps=5, solver="ddim", t_prime=200, prior=prior)
    generator = SeedNoise(range(4))
    noise = generator.randn((1, 8, 8), dtype=torch.float64)
    out = sampler.sample(digits_gmm, noise, generator=generator)
    assert out.shape == (4, 1, 8, 8) and bool(torch.isfinite(out).all())


def test_few_steps_lower_the_loss(digits) -> None:
    images = digits[0][:256].float()
    torch.manual_seed(0)
    module = VAEModule(OmegaConf.load(CONF / "net/vae_tiny.yaml"), lr=3e-3)
    optimizer = torch.optim.Adam(module.parameters(), lr=3e-3)
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(1)
        before = float(module.losses(images, 1.0)["loss"])
    for step in range(60):
        batch = images[(step * 64) % 256 :][:64]
        loss = module.losses(batch, 1.0)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(1)
        after = float(module.losses(images, 1.0)["loss"])
    assert after < before - 0.2


def test_load_errors(tmp_path: Path) -> None:
    from fastsample.lit.diffusion import DiffusionModule

    DiffusionModule(OmegaConf.load(CONF / "net/unet_tiny.yaml")).export(tmp_path / "diffusion.pt")
    with pytest.raises(UserError, match="fastsample-bundle-v1 file, not a VAE"):
        load_vae(tmp_path / "diffusion.pt")
    with pytest.raises(UserError, match="does not exist"):
        load_vae(tmp_path / "absent.pt")
    with pytest.raises(UserError, match="fmnist_vae.pt.*make pretrain"):
        vae_generator()  # the shipped asset is not in the (empty) assets folder
