"""Training side: every config option instantiates; smoke runs of each task; DDP, resume and export
round trips; bad input fails with a UserError that names the setting.

Everything runs on the CPU with sklearn's 8x8 digits and tiny networks (conf/net/*_tiny.yaml).
"""

from __future__ import annotations

import contextlib
import csv
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fastsample.data.datasets import FASHION_MNIST
from fastsample.diffusion.discrete import DiscreteSchedule
from fastsample.jobs.sampling import generate
from fastsample.jobs.setup import build_guidance, build_model
from fastsample.jobs.training import instantiate_group, train
from fastsample.lit.classifier import ClassifierModule
from fastsample.lit.diffusion import DiffusionModule
from fastsample.lit.loading import load_classifier, load_denoiser
from fastsample.lit.optim import lr_factor
from fastsample.metrics.features import ClassifierFeatures
from fastsample.models.bundle import ASSETS_ENV, asset_path, load_asset
from fastsample.models.sigma_classifier import SigmaClassifier
from fastsample.samplers import Sampler
from fastsample.samplers.generation import generate_batch
from fastsample.utils.errors import UserError
from fastsample.utils.images import to_uint8
from fastsample.utils.instantiation import find_user_error
from fastsample.utils.instantiation import instantiate as instantiate_checked

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
FMNIST_PRESENT = any(Path(FASHION_MNIST.system_dir).glob("train-images-idx3-ubyte*"))
# Small digits runs: 8x8 images, tiny nets, no sample grids.
TINY_DIFFUSION = [
    "dataset=digits",
    "dataset.subset=128",
    "dataset.val_subset=32",
    "dataset.batch_size=32",
    "task=diffusion",
    "net@task.net=unet_tiny",
    "callbacks.sample_grid=null",
]
TINY_CLASSIFIER = [
    *TINY_DIFFUSION[:4],
    "task=classifier",
    "net@task.net=classifier_tiny",
    "callbacks.sample_grid=null",
]


def options(group: str) -> list[str]:
    """The option names of a config group (its yaml files)."""
    return sorted(path.stem for path in (CONF / group).glob("*.yaml"))


def compose_config(config_name: str, overrides: list[str], output_dir: Path) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` as the entry point would, writing under ``output_dir``."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            config_name,
            overrides=[
                f"paths.output_dir={output_dir}",
                f"paths.cache_dir={output_dir / 'cache'}",
                *overrides,
            ],
        )


def user_error(excinfo: pytest.ExceptionInfo) -> UserError:
    """The UserError raised (possibly wrapped by Hydra's instantiate in code we do not own)."""
    error = find_user_error(excinfo.value)
    assert error is not None, f"expected a UserError, got {excinfo.value!r}"
    return error


@contextlib.contextmanager
def skip_if_asset_missing(what: str) -> Iterator[None]:
    """Skip (with the reason) when building ``what`` needs a shipped model that is not built here."""
    try:
        yield
    except Exception as err:
        error = find_user_error(err)
        if error is not None and "make pretrain" in str(error):
            pytest.skip(f"{what} needs a shipped asset that is not built here: {error}")
        raise


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Data and asset lookups must not depend on the caller's environment; W&B never goes online.
    monkeypatch.setenv("FASTSAMPLE_DATA", str(tmp_path / "data"))
    monkeypatch.delenv(ASSETS_ENV, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")


def tiny_diffusion_module(objective: str = "edm", seed: int = 0, **settings) -> DiffusionModule:
    """A tiny DiffusionModule with random (non-trivial) weights whose EMA differs from the live net."""
    net = OmegaConf.load(CONF / "net/unet_tiny.yaml")
    module = DiffusionModule(net, objective=objective, **settings)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _ in range(3):  # three different weight sets averaged into the EMA
            for parameter in module.net.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
            module.ema.update_parameters(module.net)
    return module.eval()


def tiny_classifier_module(noisy: bool, seed: int = 0) -> ClassifierModule:
    """A tiny ClassifierModule with random weights."""
    torch.manual_seed(seed)
    return ClassifierModule(OmegaConf.load(CONF / "net/classifier_tiny.yaml"), noisy=noisy).eval()


def read_csv_steps(path: Path) -> list[int]:
    """The ``step`` column of a CSVLogger metrics file."""
    with open(path) as handle:
        return [int(row["step"]) for row in csv.DictReader(handle) if row.get("step")]


# ----------------------------------------------------------------------------- (a) every option


MISSING_DATA = {"cifar10": "cifar", "mnist": "mnist", "image_folder": "dataset.root"}


@pytest.mark.parametrize("name", options("dataset"))
def test_dataset_option(name: str, tmp_path: Path) -> None:
    cfg = compose_config("train", [f"dataset={name}"], tmp_path)
    assert compose_config("sample", [f"dataset={name}"], tmp_path).dataset == cfg.dataset  # both entry points
    datamodule = instantiate(cfg.dataset)
    absent = name in MISSING_DATA or (name == "fashion_mnist" and not FMNIST_PRESENT)
    if absent:  # no data on this machine: the error says where it looked / what to set
        with pytest.raises(UserError) as excinfo:
            datamodule.dataset("test")
        message = str(excinfo.value)
        if name != "image_folder":
            assert str(tmp_path / "data") in message and "dataset.root" in message
        assert MISSING_DATA.get(name, "fashion") in message
        return
    batch = next(iter(datamodule.test_dataloader()))
    assert tuple(batch[0].shape[1:]) == tuple(datamodule.data_shape)


@pytest.mark.parametrize("name", options("task"))
def test_task_option(name: str, tmp_path: Path) -> None:
    cfg = compose_config("train", [f"task={name}"], tmp_path)
    module = instantiate(cfg.task, _recursive_=False)
    assert isinstance(module, pl.LightningModule)
    if getattr(module, "image_shape", None) is not None:  # default nets fit the default dataset
        assert tuple(module.image_shape) == (1, 28, 28)


@pytest.mark.parametrize("name", options("trainer"))
def test_trainer_option(name: str, tmp_path: Path) -> None:
    cfg = compose_config("train", [f"trainer={name}"], tmp_path)
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        cfg.trainer.accelerator = "cpu"  # still checks every other key is a valid Trainer argument
    trainer = instantiate(cfg.trainer)
    assert isinstance(trainer, pl.Trainer)
    if name == "ddp_cpu":
        assert trainer.world_size == 2


@pytest.mark.parametrize("name", options("logger"))
def test_logger_option(name: str, tmp_path: Path) -> None:
    cfg = compose_config("train", [f"logger={name}"], tmp_path)
    with skip_if_asset_missing(f"logger={name}"):
        loggers = instantiate_group(cfg.get("logger"))
    assert len(loggers) == (0 if name == "none" else 1)
    assert all(isinstance(logger, pl.loggers.Logger) for logger in loggers)


@pytest.mark.parametrize("name", options("callbacks"))
def test_callbacks_option(name: str, tmp_path: Path) -> None:
    cfg = compose_config("train", [f"callbacks={name}"], tmp_path)
    with skip_if_asset_missing(f"callbacks={name}"):
        callbacks = instantiate_group(cfg.get("callbacks"))
    assert callbacks and all(isinstance(callback, pl.Callback) for callback in callbacks)


def train_experiments() -> list[str]:
    """Experiments of train.py: those that pick a task (evaluate.py's, e.g. restart_fmnist, pick a
    sampler instead and are composed in their own tests)."""
    return [
        name
        for name in options("experiment")
        if "override /task" in (CONF / "experiment" / f"{name}.yaml").read_text()
    ]


@pytest.mark.parametrize("name", train_experiments())
def test_experiment_option(name: str, tmp_path: Path) -> None:
    cfg = compose_config("train", [f"experiment={name}"], tmp_path)
    module = instantiate(cfg.task, _recursive_=False)
    datamodule = instantiate(cfg.dataset)
    if getattr(module, "image_shape", None) is not None:
        assert tuple(module.image_shape) == tuple(datamodule.data_shape)
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        cfg.trainer.accelerator = "cpu"
    with skip_if_asset_missing(f"experiment={name}"):
        callbacks = instantiate_group(cfg.get("callbacks"))
    assert isinstance(instantiate(cfg.trainer, callbacks=callbacks), pl.Trainer)


@pytest.mark.parametrize("name", options("sampler"))
def test_sampler_option(name: str, tmp_path: Path) -> None:
    cfg = compose_config("sample", [f"sampler={name}"], tmp_path)
    if OmegaConf.is_missing(cfg.sampler, "path"):  # learned samplers (dsno, ggdm) load a trained file
        with pytest.raises(UserError, match=r"sampler\.path is required"):
            instantiate_checked(cfg.sampler)
        return
    sampler = instantiate(cfg.sampler)
    assert isinstance(sampler, Sampler) and sampler.nfe >= 1


MODEL_OVERRIDES = {
    "gmm_fmnist": ["model.subset=6000"],  # fit on a slice: the test checks the plumbing
    "callable": ["model.fn=fastsample.models.gmm.GaussianMixture.toy", "model.kwargs={name: ring}"],
}


def tiny_diffusers_folder(name: str, root: Path) -> Path:
    """A tiny random diffusers folder for model=diffusers / diffusers_t2i (skips without the extra)."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from diffusers_tiny import save_text_to_image, save_unet_pipeline

    return save_text_to_image(root) if name == "diffusers_t2i" else save_unet_pipeline(root)


@pytest.mark.parametrize("name", options("model"))
def test_model_option(name: str, tmp_path: Path) -> None:
    overrides = [f"model={name}", *MODEL_OVERRIDES.get(name, [])]
    if name == "from_checkpoint":
        tiny_diffusion_module().export(tmp_path / "model.pt")
        overrides.append(f"model.path={tmp_path / 'model.pt'}")
    if name in ("diffusers", "diffusers_t2i"):
        overrides.append(f"model.path={tiny_diffusers_folder(name, tmp_path / name)}")
    cfg = compose_config("sample", overrides, tmp_path)
    if name == "gmm_fmnist" and not FMNIST_PRESENT:
        pytest.skip("model=gmm_fmnist needs Fashion-MNIST, which is not installed here")
    with skip_if_asset_missing(f"model={name}"):
        model = build_model(cfg, torch.device("cpu"))
    shape = model.image_shape
    x = torch.randn(2, *shape) if shape else torch.randn(2, 2)
    with torch.no_grad():
        assert model(x, 1.0).shape == x.shape


@pytest.mark.parametrize("name", options("guidance"))
def test_guidance_option(name: str, tmp_path: Path) -> None:
    cfg = compose_config("sample", [f"guidance={name}", "model=gmm_toy"], tmp_path)
    with skip_if_asset_missing(f"guidance={name}"):
        guidance = build_guidance(cfg)
    assert (guidance is None) == (name == "none")


def test_missing_asset_says_make_pretrain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ASSETS_ENV, str(tmp_path))
    with pytest.raises(UserError, match="make pretrain") as excinfo:
        asset_path("fmnist_diffusion.pt")
    assert str(tmp_path / "fmnist_diffusion.pt") in str(excinfo.value)


def test_shipped_model_config_loads_assets_by_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = tiny_diffusion_module()
    module.export(tmp_path / "fmnist_diffusion.pt")
    tiny_classifier_module(noisy=True).export(tmp_path / "fmnist_classifier.pt")
    monkeypatch.setenv(ASSETS_ENV, str(tmp_path))
    cfg = compose_config("sample", ["model=unet_fmnist"], tmp_path / "out")
    denoiser = build_model(cfg, torch.device("cpu"))
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(denoiser(x, 0.7), module.denoiser(ema=True)(x, 0.7))
    assert isinstance(load_asset("fmnist_classifier.pt"), SigmaClassifier)


# ----------------------------------------------------------------------------- (b) smoke runs


SMOKE_RUNS = {
    "diffusion-edm": [*TINY_DIFFUSION, "task.objective=edm", "task.max_timestep=500"],
    "diffusion-ddpm": [*TINY_DIFFUSION, "task.objective=ddpm", "task.prediction=v", "task.max_timestep=500"],
    "classifier-noisy": [*TINY_CLASSIFIER, "task.noisy=true", "task.head_lr_scale=10"],
    "classifier-clean": [
        *TINY_CLASSIFIER,
        "task.noisy=false",
        "task.lr_schedule=cosine",
        "task.warmup_steps=2",
    ],
}


@pytest.mark.parametrize("run", SMOKE_RUNS)
def test_fast_dev_run(run: str, tmp_path: Path) -> None:
    cfg = compose_config("train", [*SMOKE_RUNS[run], "trainer=debug"], tmp_path)
    metrics = train(cfg)
    assert np.isfinite(metrics["train/loss"]) and np.isfinite(metrics["val/loss"])
    if run.startswith("classifier"):
        assert 0.0 <= metrics["train/acc"] <= 1.0 and 0.0 <= metrics["val/acc"] <= 1.0
        classifier = load_classifier(tmp_path / "model.pt")
        assert classifier.noisy == (run == "classifier-noisy")
        assert classifier(torch.randn(2, 1, 8, 8), 0.5).shape == (2, 10)
    else:
        denoiser = load_denoiser(tmp_path / "model.pt")
        assert denoiser(torch.randn(2, 1, 8, 8), 0.5).shape == (2, 1, 8, 8)


def test_edm_max_timestep_bounds_training_sigma() -> None:
    net = OmegaConf.load(CONF / "net/unet_tiny.yaml")
    module = DiffusionModule(net, objective="edm", max_timestep=200)
    assert module.sigma_upper() == pytest.approx(float(DiscreteSchedule("linear", 1000).sigmas[199]))


def test_classifier_lr_schedule() -> None:
    assert [lr_factor(step, warmup=4) for step in (0, 1, 3, 100)] == [0.25, 0.5, 1.0, 1.0]
    cosine = [lr_factor(step, warmup=0, total=100) for step in (0, 50, 100, 200)]
    assert cosine == pytest.approx([1.0, 0.5, 0.0, 0.0], abs=1e-12)
    assert lr_factor(1, warmup=4, total=float("inf")) == 0.5  # unknown length: warm-up only


def test_classifier_head_learning_rate() -> None:
    net = OmegaConf.load(CONF / "net/classifier_tiny.yaml")
    optimizer = ClassifierModule(net, lr=1e-3, head_lr_scale=10).configure_optimizers()
    body, head = optimizer.param_groups
    assert body["lr"] == 1e-3 and head["lr"] == pytest.approx(1e-2) and len(head["params"]) == 2
    assert len(ClassifierModule(net).configure_optimizers().param_groups) == 1


# ----------------------------------------------------------------------------- (c) DDP on the CPU


def test_ddp_cpu_two_processes(tmp_path: Path) -> None:
    command = [
        sys.executable,
        "train.py",
        *TINY_DIFFUSION,
        "trainer=ddp_cpu",
        "trainer.max_steps=2",
        "trainer.limit_val_batches=1",
        "trainer.log_every_n_steps=1",
        "logger=csv",
        f"hydra.run.dir={tmp_path}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FASTSAMPLE_DEBUG": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MEMBER: 2/2" in result.stderr + result.stdout  # the second process joined
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
    load_denoiser(tmp_path / "model.pt")
    assert "train/loss" in result.stdout  # rank 0 printed the final metrics


# ----------------------------------------------------------------------------- (d) resume


def test_resume_continues_steps_and_logs(tmp_path: Path) -> None:
    common = [
        *TINY_DIFFUSION,
        "dataset.subset=256",
        "trainer=cpu",
        "trainer.log_every_n_steps=1",
        "trainer.limit_val_batches=1",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "logger=csv",
        "+trainer.enable_progress_bar=false",
    ]
    train(compose_config("train", [*common, "trainer.max_steps=4"], tmp_path))
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 4
    train(compose_config("train", [*common, "trainer.max_steps=6", "ckpt_path=last"], tmp_path))
    assert torch.load(last, weights_only=False)["global_step"] == 6
    first, second = (read_csv_steps(tmp_path / "csv" / f"version_{v}" / "metrics.csv") for v in (0, 1))
    assert sorted(set(first)) == [0, 1, 2, 3]
    assert sorted(set(second)) == [4, 5]  # continues, no restart from 0
    load_denoiser(last)  # a .ckpt is a valid model.path too


# ----------------------------------------------------------------------------- (e) export round trip


@pytest.mark.parametrize("objective", ["edm", "ddpm"])
def test_exported_bundle_reproduces_in_memory_samples(objective: str, tmp_path: Path) -> None:
    module = tiny_diffusion_module(objective)
    module.export(tmp_path / "model.pt")
    seeds, batch_size = list(range(6)), 4
    overrides = [
        "model=from_checkpoint",
        f"model.path={tmp_path / 'model.pt'}",
        "sampler=euler",
        "sampler.steps=4",
        "seeds=0-5",
        f"batch_size={batch_size}",
        "device=cpu",
        "guidance=none",
    ]
    cfg = compose_config("sample", overrides, tmp_path / "samples")
    summary = generate(cfg)
    assert summary["samples"] == len(seeds)
    with np.load(tmp_path / "samples" / "samples.npz") as data:
        saved, saved_seeds = data["images"], data["seeds"]
    assert saved_seeds.tolist() == seeds
    sampler, denoiser = instantiate(cfg.sampler), module.denoiser(ema=True)
    expected = [
        to_uint8(
            generate_batch(
                sampler, denoiser, seeds[i : i + batch_size], (1, 8, 8), None, None, torch.device("cpu")
            )
        )
        for i in range(0, len(seeds), batch_size)
    ]
    assert np.array_equal(saved, np.concatenate(expected))
    loaded, x = load_denoiser(tmp_path / "model.pt"), torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x, 0.3), denoiser(x, 0.3))
        assert not torch.equal(loaded(x, 0.3), module.denoiser(ema=False)(x, 0.3))  # the EMA was exported


@pytest.mark.parametrize("noisy", [True, False])
def test_exported_classifier_round_trip_and_input_convention(noisy: bool, tmp_path: Path) -> None:
    module = tiny_classifier_module(noisy)
    module.export(tmp_path / "classifier.pt")
    loaded = load_classifier(tmp_path / "classifier.pt")
    x, sigma = torch.randn(4, 1, 8, 8), torch.tensor([0.01, 0.5, 2.0, 40.0])
    with torch.no_grad():
        logits = loaded(x, sigma)
        assert torch.equal(logits, module.classifier()(x, sigma))
        if noisy:  # EDM's c_in and c_noise
            scaled = x / (sigma**2 + 0.25).sqrt().reshape(-1, 1, 1, 1)
            assert torch.allclose(logits, module.net(scaled, sigma.log() / 4), atol=1e-6)
        else:  # sigma is ignored; ClassifierFeatures' convention (noise label 0.0) on the raw network
            assert torch.equal(logits, module.net(x, 0.0)) and torch.equal(loaded(x), logits)
            images = torch.rand(4, 1, 8, 8) * 2 - 1
            ours, theirs = ClassifierFeatures(loaded)(images), ClassifierFeatures(module.net, 0.0)(images)
            assert torch.equal(ours["features"], theirs["features"])
            assert torch.equal(ours["logits"], theirs["logits"])
    # Differentiable in x with frozen parameters: what classifier guidance needs.
    x.requires_grad_(True)
    loaded.log_prob(x, sigma, torch.tensor([0, 1, 2, 3])).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(parameter.grad is None for parameter in loaded.parameters())


# ----------------------------------------------------------------------------- (f) bad input


def train_error(tmp_path: Path, overrides: list[str]) -> str:
    """Compose + train, expecting a UserError; returns its message."""
    with pytest.raises(UserError) as excinfo:
        train(compose_config("train", [*overrides, "trainer=debug"], tmp_path))
    return str(excinfo.value)


def test_unknown_dataset_name(tmp_path: Path) -> None:
    assert "dataset.name='imagenet'" in train_error(tmp_path, [*TINY_DIFFUSION, "dataset.name=imagenet"])


def test_missing_data_root(tmp_path: Path) -> None:
    message = train_error(
        tmp_path,
        [*TINY_DIFFUSION, "dataset=mnist", f"dataset.root={tmp_path / 'nowhere'}", "task.net.image_size=28"],
    )
    assert str(tmp_path / "nowhere") in message and "dataset.root" in message


def test_image_size_not_supported_by_backbone(tmp_path: Path) -> None:
    message = train_error(
        tmp_path,
        [*TINY_DIFFUSION, "net@task.net=unet_small", "dataset.resolution=10", "task.net.image_size=10"],
    )
    assert "image_size=10" in message and "channel_mult" in message


def test_image_size_differs_from_data(tmp_path: Path) -> None:
    message = train_error(tmp_path, [*TINY_DIFFUSION, "task.net.image_size=16"])
    assert "task.net.image_size" in message and "(1, 8, 8)" in message


def test_classifier_needs_matching_labels(tmp_path: Path) -> None:
    assert "task.net.num_classes" in train_error(tmp_path, [*TINY_CLASSIFIER, "dataset.labels=false"])
    assert "task.net.num_classes=12" in train_error(tmp_path, [*TINY_CLASSIFIER, "task.net.num_classes=12"])


def test_batch_size_not_divisible_across_devices(tmp_path: Path) -> None:
    cfg = compose_config("train", [*TINY_DIFFUSION, "trainer=ddp_cpu", "dataset.batch_size=63"], tmp_path)
    with pytest.raises(UserError, match=r"dataset.batch_size=63 .* 2 devices"):
        train(cfg)  # before any process is launched


def sample_error(tmp_path: Path, path: Path) -> str:
    """``sample.py model=from_checkpoint model.path=path``, expecting a UserError; returns its message."""
    cfg = compose_config(
        "sample",
        ["model=from_checkpoint", f"model.path={path}", "seeds=0-1", "device=cpu"],
        tmp_path / "samples",
    )
    with pytest.raises(Exception) as excinfo:
        generate(cfg)
    message = str(user_error(excinfo))
    assert f"model.path={str(path)!r}" in message
    return message


def test_checkpoint_of_another_architecture(tmp_path: Path) -> None:
    # A bundle whose weights belong to a different UNet than the config it carries.
    module, other = (
        tiny_diffusion_module(),
        DiffusionModule(
            {**OmegaConf.to_container(OmegaConf.load(CONF / "net/unet_tiny.yaml")), "model_channels": 8}
        ),
    )
    bundle = torch.load(module.export(tmp_path / "model.pt"), weights_only=False)
    bundle["state_dict"] = other.ema.module.state_dict()
    torch.save(bundle, tmp_path / "mixed.pt")
    assert "does not fit" in sample_error(tmp_path, tmp_path / "mixed.pt")
    # A classifier bundle, a classifier-task checkpoint and a bare state dict are not diffusion models.
    classifier = tiny_classifier_module(noisy=True)
    classifier.export(tmp_path / "classifier.pt")
    assert "classifier bundle" in sample_error(tmp_path, tmp_path / "classifier.pt")
    torch.save(
        {"hyper_parameters": dict(classifier.hparams), "state_dict": classifier.state_dict()},
        tmp_path / "classifier.ckpt",
    )
    assert "task=diffusion" in sample_error(tmp_path, tmp_path / "classifier.ckpt")
    torch.save(module.net.state_dict(), tmp_path / "weights.pt")
    assert "not a fastsample bundle" in sample_error(tmp_path, tmp_path / "weights.pt")
    # ... and the other way round for classifiers.
    with pytest.raises(UserError, match="diffusion model bundle"):
        load_classifier(tmp_path / "model.pt")
    with pytest.raises(UserError, match="task=classifier"):
        load_classifier(_lightning_like(module, tmp_path))
    with pytest.raises(UserError, match="not a fastsample bundle"):
        load_classifier(tmp_path / "weights.pt")
    assert isinstance(load_classifier(tmp_path / "classifier.ckpt"), SigmaClassifier)


def _lightning_like(module: DiffusionModule, tmp_path: Path) -> Path:
    path = tmp_path / "diffusion.ckpt"
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, path)
    return path


def test_truncated_checkpoint(tmp_path: Path) -> None:
    data = tiny_diffusion_module().export(tmp_path / "model.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    assert "not a readable checkpoint" in sample_error(tmp_path, tmp_path / "truncated.pt")
    assert "does not exist" in sample_error(tmp_path, tmp_path / "missing.pt")
    with pytest.raises(UserError, match="classifier.path=.*not a readable checkpoint"):
        load_classifier(tmp_path / "truncated.pt")
