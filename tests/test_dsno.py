"""DSNO: the spectral time layer, the operator (one evaluation, identity at initialization), trajectory
generation that resumes after an interruption, the task's smoke runs, ``sampler=dsno`` and bad input.

All on the CPU with 8x8 images and tiny networks (a few seconds each).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate as hydra_instantiate
from omegaconf import OmegaConf

from fastsample.data.trajectories import (
    TrajectoryDataModule,
    TrajectoryStore,
    plan_chunks,
    trajectory_sigmas,
)
from fastsample.diffusion import EDMDenoiser
from fastsample.diffusion.denoiser import CountingDenoiser
from fastsample.jobs.sampling import generate
from fastsample.jobs.training import train
from fastsample.lit.diffusion import DiffusionModule
from fastsample.lit.dsno import DSNOModule
from fastsample.models.bundle import load_bundle
from fastsample.models.dsno import (
    DSNOOperator,
    SpectralTimeConv,
    TemporalLayer,
    dsno_loss,
    edm_labels,
    fingerprint,
    is_teacher,
    load_backbone_weights,
    load_operator,
    plain_name,
    point_weights,
)
from fastsample.models.unet import UNet
from fastsample.samplers import Sampler, insert_sigmas
from fastsample.samplers.dsno import DSNOSampler
from fastsample.utils.errors import UserError
from fastsample.utils.instantiation import find_user_error

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
TINY_NET = OmegaConf.to_container(OmegaConf.load(CONF / "net/unet_tiny.yaml"))


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("FASTSAMPLE_DATA", str(tmp_path / "data"))
    yield
    torch.set_num_threads(previous)


def user_error(excinfo: pytest.ExceptionInfo) -> UserError:
    error = find_user_error(excinfo.value)
    assert error is not None, f"expected a UserError, got {excinfo.value!r}"
    return error


def random_unet(seed: int = 0, **overrides) -> UNet:
    """The tiny UNet with random non-zero weights (the zero-initialized output layers too)."""
    torch.manual_seed(seed)
    net = hydra_instantiate({**TINY_NET, **overrides})
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.normal_(0.0, 0.2)
    return net


def tiny_teacher(seed: int = 0, image_shape=(1, 8, 8), **overrides) -> EDMDenoiser:
    return EDMDenoiser(random_unet(seed, **overrides), image_shape=image_shape).eval().requires_grad_(False)


def tiny_teacher_bundle(path: Path, seed: int = 0) -> Path:
    """A tiny diffusion model with random weights, exported as a bundle (model=from_checkpoint)."""
    module = DiffusionModule(TINY_NET)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.net.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
        module.ema.update_parameters(module.net)
    module.export(path)
    return path


def tiny_data(tmp_path: Path, teacher, **settings) -> TrajectoryDataModule:
    options = dict(
        M=4,
        count=10,
        val_count=3,
        chunk_size=3,
        path=str(tmp_path / "traj"),
        device="cpu",
        batch_size=4,
        progress=False,
    )
    options.update(settings)
    return TrajectoryDataModule(teacher, Sampler("ddim", 6, "karras"), **options)


# ----------------------------------------------------------------------------- the spectral layer


def test_spectral_time_conv_shapes_linearity_and_time_shift_equivariance() -> None:
    torch.manual_seed(0)
    layer = SpectralTimeConv(channels=3, modes=2)
    with torch.no_grad():
        layer.weight.normal_()
    for frames in (2, 4, 5):
        x, y = torch.randn(2, frames, 3, 4, 4), torch.randn(2, frames, 3, 4, 4)
        out = layer(x)
        assert out.shape == x.shape
        torch.testing.assert_close(layer(2 * x - 3 * y), 2 * out - 3 * layer(y), atol=1e-5, rtol=1e-5)
        # a circular convolution over time: shifting the frames shifts the output
        torch.testing.assert_close(layer(x.roll(1, dims=1)), out.roll(1, dims=1), atol=1e-5, rtol=1e-5)
    # frames constant in time hold only the zero frequency: the output is constant in time too
    constant = torch.randn(2, 1, 3, 4, 4).expand(2, 4, 3, 4, 4)
    out = layer(constant)
    torch.testing.assert_close(out, out[:, :1].expand_as(out), atol=1e-5, rtol=1e-5)
    # the kept modes act channel-wise as the complex weights: mode 0 of a constant input is W_0^T x
    weight0 = layer.weight[0, ..., 0]
    expected = torch.einsum("bi...,io->bo...", constant[:, 0], weight0)
    torch.testing.assert_close(out[:, 0], expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(UserError, match="task.modes=3 exceeds the 2 frequencies of M=2"):
        SpectralTimeConv(3, modes=3)(torch.randn(1, 2, 3, 4, 4))


def test_zero_weights_are_the_identity() -> None:
    layer = TemporalLayer(channels=3, modes=2)
    x = torch.randn(2, 4, 3, 5, 5)
    assert torch.equal(layer(x), x)
    assert torch.equal(layer.conv(x), torch.zeros_like(x))


def test_operator_at_initialization_is_the_backbone_per_output_time() -> None:
    unet = random_unet()
    reference = copy.deepcopy(unet)
    operator = DSNOOperator(unet, frames=4, modes=2, time_embedding="output")
    assert operator.temporal_layers == 8  # after every residual block of the tiny UNet
    sigmas = [80.0, 5.0, 0.7, 0.05, 0.0]
    operator.set_sigmas(sigmas)
    x = 80.0 * torch.randn(3, 1, 8, 8)
    labels = torch.tensor([1, 2, 3])
    states = operator(x, labels)
    assert states.shape == (3, 4, 1, 8, 8)
    s0, sd = 80.0, 0.5
    c_in, c_skip, c_out = (s0**2 + sd**2) ** -0.5, sd**2 / (s0**2 + sd**2), s0 * sd / (s0**2 + sd**2) ** 0.5
    for m, sigma in enumerate(sigmas[1:]):
        label = edm_labels(torch.tensor([sigma]), 0.002).expand(3)
        x0 = c_skip * x + c_out * reference(c_in * x, label, labels)  # the teacher's raw net, frame m's label
        torch.testing.assert_close(states[:, m], x0 + sigma / s0 * (x - x0), atol=1e-4, rtol=1e-5)
    # the last frame (sigma = 0) is the data estimate itself
    assert operator.sigmas[-1] == 0


def test_start_time_embedding_begins_as_the_teachers_one_step_jump() -> None:
    teacher = tiny_teacher(seed=2)
    operator = DSNOOperator(random_unet(seed=9), frames=3, modes=2, time_embedding="start")
    load_backbone_weights(operator, teacher.net)  # the wrapped embedding's weights map too
    sigmas = [80.0, 2.0, 0.3, 0.0]
    operator.set_sigmas(sigmas)
    x = 80.0 * torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        states = operator(x)
        x0 = teacher(x, 80.0)  # every frame: the teacher's estimate at the input level, then DDIM's jump
    for m, sigma in enumerate(sigmas[1:]):
        torch.testing.assert_close(states[:, m], x0 + sigma / 80.0 * (x - x0), atol=1e-4, rtol=1e-5)
    # the per-frame embeddings are what separate the frames once trained
    embedding = operator.backbone.embed
    with torch.no_grad():
        embedding.offsets[1].normal_()
        moved = operator(x)
    assert not torch.allclose(moved[:, 1], states[:, 1])
    torch.testing.assert_close(moved[:, 0], states[:, 0])  # zero temporal weights: frames do not mix yet
    assert embedding.offsets.shape == (3, 64)  # 4 x model_channels of the tiny UNet


def test_operator_forward_is_one_network_evaluation() -> None:
    operator = DSNOOperator(random_unet(), frames=4, modes=2)
    operator.set_sigmas([80.0, 5.0, 0.7, 0.05, 0.0])
    batches = []
    operator.backbone.register_forward_hook(lambda module, inputs, output: batches.append(len(inputs[0])))
    operator(torch.randn(5, 1, 8, 8))
    assert batches == [5 * 4] and operator.calls == 1  # one backbone pass over all B * M frames


def test_backbone_weights_round_trip_and_mismatch() -> None:
    teacher_net = random_unet(seed=3)
    operator = DSNOOperator(random_unet(seed=4), frames=2, modes=1)
    load_backbone_weights(operator, teacher_net)
    own = operator.backbone.state_dict()
    # every teacher tensor lands under its wrapped name (temporal blocks, the frame-embedding wrapper)
    assert own["encoder.down.0.0.block.conv1.weight"].equal(
        teacher_net.state_dict()["encoder.down.0.0.conv1.weight"]
    )
    assert own["embed.inner.mlp.0.weight"].equal(teacher_net.state_dict()["embed.mlp.0.weight"])
    plain = {plain_name(k): v for k, v in own.items() if is_teacher(k)}
    assert plain.keys() == teacher_net.state_dict().keys()
    assert all(torch.equal(plain[name], value) for name, value in teacher_net.state_dict().items())
    # the parts the teacher does not have start at zero
    assert all(not v.any() for k, v in own.items() if not is_teacher(k))
    with pytest.raises(UserError, match="task.net does not match the teacher's network"):
        load_backbone_weights(operator, random_unet(model_channels=32))


def test_point_weights_and_loss() -> None:
    sigmas = torch.tensor([2.0, 0.5, 1e-3, 0.0])
    assert point_weights(sigmas).tolist() == pytest.approx([1.0, 2.0, 1000.0, 1e4])
    assert point_weights(sigmas, "final").tolist() == [0, 0, 0, 1]
    target = torch.zeros(2, 4, 1, 2, 2)
    predicted = torch.ones(2, 4, 1, 2, 2)
    loss, per_point = dsno_loss(predicted, target, sigmas, point_weights(sigmas, "uniform"))
    assert per_point.tolist() == pytest.approx([1 / 5, 1 / 1.25, 1 / (1 + 1e-6), 1.0])  # VP scale 1/(1+s^2)
    assert float(loss) == pytest.approx(float(per_point.mean()))


# ----------------------------------------------------------------------------- trajectory data


def test_trajectory_levels_follow_dsno_quadratic_times() -> None:
    teacher = tiny_teacher()
    levels = trajectory_sigmas("quadratic", 4, teacher)
    assert len(levels) == 5 and levels[0] == pytest.approx(80.0) and levels[-1] == 0
    assert bool((levels[:-1] > levels[1:]).all())
    explicit = trajectory_sigmas({"kind": "explicit", "sigmas": [80.0, 1.0, 0.0]}, 2, teacher)
    assert explicit.tolist() == [80.0, 1.0, 0.0]
    with pytest.raises(UserError, match="dataset.times.sigmas"):
        trajectory_sigmas({"kind": "explicit", "sigmas": [80.0, 1.0, 0.0]}, 4, teacher)
    assert [len(chunk) for chunk in plan_chunks(10, 7, 3)] == [3, 3, 1]


class Interrupted(RuntimeError):
    pass


def test_generation_resumes_after_interruption_without_duplicates_or_gaps(tmp_path: Path) -> None:
    teacher = tiny_teacher()
    data = tiny_data(tmp_path, teacher)
    written: list[Path] = []

    def crash_after_two(path: Path) -> None:
        written.append(path)
        if len(written) == 2:
            raise Interrupted("killed")

    with pytest.raises(Interrupted):
        data.prepare_data(after_chunk=crash_after_two)
    chunk_dir = tmp_path / "traj" / "chunks"
    assert sorted(p.name for p in chunk_dir.iterdir()) == sorted(p.name for p in written)  # no partial files
    resumed = tiny_data(tmp_path, teacher)
    made: list[Path] = []
    resumed.prepare_data(after_chunk=made.append)
    assert len(made) == 4 - 2 + 1  # the two missing training chunks and the validation chunk
    assert not set(made) & set(written)
    resumed.setup("fit")
    store = TrajectoryStore(tmp_path / "traj")
    seeds = np.concatenate([np.load(store.chunk_path(c))["seeds"] for c in resumed.chunks("train")])
    assert seeds.tolist() == list(range(100_000_000, 100_000_010))  # every seed once, in order
    states, labels = resumed.dataset("train").tensors
    assert states.shape == (10, 5, 1, 8, 8) and len(resumed.dataset("val")) == 3
    assert bool((labels == -1).all())
    # the same as an uninterrupted run, and each trajectory starts at sigma_0 * its seed's noise
    fresh = tiny_data(tmp_path / "fresh", teacher)
    fresh.prepare_data()
    fresh.setup("fit")
    torch.testing.assert_close(fresh.dataset("train").tensors[0], states, atol=0, rtol=0)
    from fastsample.utils.seeding import SeedNoise

    start = SeedNoise([100_000_004]).randn((1, 8, 8)) * float(fresh.sigmas()[0])
    torch.testing.assert_close(states[4, 0], start[0])
    # the final state is the teacher sampler's solution from that start (DDIM, the levels inserted)
    ddim = Sampler("ddim", 6, "karras")
    grid = insert_sigmas(ddim.sigmas(teacher), fresh.sigmas().tolist())
    with torch.no_grad():
        final = ddim.run(teacher, states[4:5, 0], grid)
    torch.testing.assert_close(states[4, -1], final[0], atol=1e-5, rtol=1e-5)


def test_larger_count_adds_chunks_only(tmp_path: Path) -> None:
    teacher = tiny_teacher()
    tiny_data(tmp_path, teacher, count=4, val_count=0).prepare_data()
    made: list[Path] = []
    bigger = tiny_data(tmp_path, teacher, count=7, val_count=0)
    bigger.prepare_data(after_chunk=made.append)
    assert [p.name for p in made] == ["seeds-0100000003-0100000005.npz", "seeds-0100000006-0100000006.npz"]
    bigger.setup("fit")
    assert len(bigger.dataset("train")) == 7


def test_trajectories_of_another_model_or_shape_are_refused(tmp_path: Path) -> None:
    tiny_data(tmp_path, tiny_teacher(seed=0), count=3, val_count=0).prepare_data()
    other = tiny_data(tmp_path, tiny_teacher(seed=1), count=3, val_count=0)
    with pytest.raises(UserError, match="holds trajectories of a different model") as excinfo:
        other.prepare_data()
    assert str(tmp_path / "traj") in str(excinfo.value) and "dataset.path" in str(excinfo.value)
    with pytest.raises(UserError, match="different model"):
        other.setup("fit")
    # the same weights declaring another data shape (the tiny UNet is fully convolutional)
    reshaped = tiny_data(tmp_path, tiny_teacher(seed=0, image_shape=(1, 16, 16)), count=3, val_count=0)
    with pytest.raises(UserError, match=r"shape \[1, 8, 8\], but the teacher makes \[1, 16, 16\]"):
        reshaped.prepare_data()
    fewer = tiny_data(tmp_path, tiny_teacher(seed=0), M=2, count=3, val_count=0)
    with pytest.raises(UserError, match="holds M=4 points"):
        fewer.prepare_data()
    # a chunk file that does not hold what its name says is refused, naming the file
    good = tiny_data(tmp_path, tiny_teacher(seed=0), count=3, val_count=0)
    chunk = good.store.chunk_path(good.chunks("train")[0])
    with np.load(chunk) as content:
        arrays = dict(content)
    np.savez(chunk.with_suffix(".tmp.npz"), **{**arrays, "seeds": arrays["seeds"] + 1})
    chunk.with_suffix(".tmp.npz").replace(chunk)
    with pytest.raises(UserError, match="delete it and rerun"):
        good.setup("fit")


def test_cache_folder_is_keyed_by_teacher(tmp_path: Path) -> None:
    first = tiny_data(tmp_path, tiny_teacher(seed=0), path=None, cache_dir=str(tmp_path / "cache"))
    second = tiny_data(tmp_path, tiny_teacher(seed=1), path=None, cache_dir=str(tmp_path / "cache"))
    assert first.root != second.root and first.root.parent == tmp_path / "cache" / "trajectories"


# ----------------------------------------------------------------------------- training and sampling


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


def tiny_dsno_overrides(teacher: Path) -> list[str]:
    return [
        "task=dsno",
        "model@dataset.teacher=from_checkpoint",
        f"dataset.teacher.path={teacher}",
        "net@task.net=unet_tiny",
        "dataset.count=8",
        "dataset.val_count=4",
        "dataset.chunk_size=4",
        "dataset.sampler.steps=4",
        "dataset.batch_size=4",
        "dataset.device=cpu",
        "dataset.progress=false",
        "task.grid_seeds=4",
        "callbacks.sample_grid=null",
    ]


@pytest.mark.parametrize("mode", ["dsno", "kd"])
def test_fast_dev_run_and_one_evaluation_sampling(mode: str, tmp_path: Path) -> None:
    teacher_path = tiny_teacher_bundle(tmp_path / "teacher.pt")
    cfg = compose_train([*tiny_dsno_overrides(teacher_path), f"task.mode={mode}", "trainer=debug"], tmp_path)
    metrics = train(cfg)
    assert np.isfinite(metrics["train/loss"]) and np.isfinite(metrics["val/loss"])
    assert np.isfinite(metrics["val/final_rmse"])
    assert list((tmp_path / "grids").glob(f"{mode}-step-*.png"))  # the sample grid of the EMA operator
    operator, record = load_operator(tmp_path / "model.pt")
    assert record["mode"] == mode and operator.frames == (4 if mode == "dsno" else 1)
    assert operator.temporal_layers == (8 if mode == "dsno" else 0)
    assert record["sigmas"][0] == pytest.approx(80.0) and record["sigmas"][-1] == 0.0
    teacher = load_bundle(teacher_path)
    assert record["teacher"]["fingerprint"] == fingerprint(teacher)

    # sample.py with sampler=dsno: one network evaluation per batch, the teacher never called
    sampler = DSNOSampler(tmp_path / "model.pt")
    counting = CountingDenoiser(teacher)
    images = sampler.sample(counting, torch.randn(6, 1, 8, 8))
    assert images.shape == (6, 1, 8, 8) and sampler.calls == 1 and counting.calls == 0 and sampler.nfe == 1
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        sample_cfg = compose(
            "sample",
            overrides=[
                "model=from_checkpoint",
                f"model.path={teacher_path}",
                "sampler=dsno",
                f"sampler.path={tmp_path / 'model.pt'}",
                "seeds=0-9",
                "batch_size=4",
                "device=cpu",
                f"paths.output_dir={tmp_path / 'samples'}",
            ],
        )
    summary = generate(sample_cfg)
    assert summary["nfe"] == 1 and summary["sampler"] == "dsno" and summary["samples"] == 10
    with np.load(tmp_path / "samples" / "samples.npz") as samples:
        assert samples["images"].shape == (10, 8, 8, 1)


def test_operator_learns_the_final_frame(tmp_path: Path) -> None:
    """Twenty steps on fixed trajectories cut the (final-frame dominated) loss below a third."""
    teacher = tiny_teacher(seed=0)
    data = tiny_data(tmp_path, teacher, count=8, val_count=0, chunk_size=8, M=2)
    data.prepare_data()
    data.setup("fit")
    module = DSNOModule(TINY_NET, M=2, modes=1, grid_every_n_steps=0)
    module.attach_data(data.metadata(), teacher)
    states, labels = data.dataset("train").tensors
    optimizer = torch.optim.Adam(module.operator.parameters(), lr=3e-3)
    first = None
    for _ in range(20):
        loss, _, _ = module.loss((states, labels))
        first = float(loss.detach()) if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(loss) < 0.3 * first


# ----------------------------------------------------------------------------- bad input


@pytest.fixture()
def trained_operator(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny operator bundle (M=4, not trained: only its file format matters here) and its teacher."""
    teacher_path = tiny_teacher_bundle(tmp_path / "teacher.pt")
    teacher = load_bundle(teacher_path)
    data = tiny_data(tmp_path, teacher, count=2, val_count=0, chunk_size=2)
    data.prepare_data()
    module = DSNOModule(TINY_NET, M=4, grid_every_n_steps=0)
    module.attach_data(data.metadata(), teacher)
    module.export(tmp_path / "dsno.pt")
    return tmp_path / "dsno.pt", teacher_path


def test_m_mismatch_with_the_checkpoint_or_data(trained_operator: tuple[Path, Path], tmp_path: Path) -> None:
    path, teacher_path = trained_operator
    with pytest.raises(UserError, match=r"sampler.M=3 but the operator .* was trained with M=4"):
        DSNOSampler(path, M=3)
    assert DSNOSampler(path, M=4).operator.frames == 4
    teacher = load_bundle(teacher_path)
    data = tiny_data(tmp_path / "m2", teacher, M=2, count=2, val_count=0, chunk_size=2)
    data.prepare_data()
    with pytest.raises(UserError, match=r"task.M=4 but the trajectories hold M=2 points"):
        DSNOModule(TINY_NET, M=4).attach_data(data.metadata(), teacher)
    # resuming a checkpoint with another M
    module = DSNOModule(TINY_NET, M=2)
    with pytest.raises(UserError, match=r"task.M=2 but the checkpoint was trained with task.M=4"):
        module.on_load_checkpoint({"hyper_parameters": {"mode": "dsno", "M": 4, "modes": 2}})


def test_sampler_refuses_another_model_guidance_and_foreign_files(
    trained_operator: tuple[Path, Path], tmp_path: Path
) -> None:
    path, teacher_path = trained_operator
    sampler = DSNOSampler(path)
    noise = torch.randn(2, 1, 8, 8)
    with pytest.raises(UserError, match="was distilled from"):
        sampler.sample(tiny_teacher(seed=5), noise)
    with pytest.raises(UserError, match="cannot apply guidance"):
        sampler.sample(load_bundle(teacher_path), noise, guidance=lambda x, s, d: d)
    assert DSNOSampler(path, check_model=False).sample(tiny_teacher(seed=5), noise).shape == noise.shape
    with pytest.raises(UserError, match="is not a DSNO operator"):
        DSNOSampler(teacher_path)  # a diffusion bundle
    with pytest.raises(UserError, match="does not exist"):
        DSNOSampler(tmp_path / "missing.pt")


def test_configs_compose(tmp_path: Path) -> None:
    cfg = compose_train(["experiment=dsno_fmnist"], tmp_path)
    assert cfg.task.mode == "dsno" and cfg.task.M == cfg.dataset.M
    assert cfg.dataset._target_.endswith("TrajectoryDataModule") and "name" not in cfg.dataset
    kd = compose_train(["experiment=dsno_kd_fmnist"], tmp_path)
    assert kd.task.mode == "kd" and kd.dataset == cfg.dataset  # the same trajectories (one generation)
    module = hydra_instantiate(cfg.task, _recursive_=False)
    assert isinstance(module, DSNOModule) and module.image_shape == (1, 28, 28)
    datamodule = hydra_instantiate(cfg.dataset)  # cheap: the teacher is built on first use
    assert isinstance(datamodule, TrajectoryDataModule) and datamodule.sampler.name == "heun"
    if (ROOT / "fastsample" / "assets" / "fmnist_diffusion.pt").is_file():
        assert datamodule.data_shape == module.image_shape  # what train.py's shape check compares
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        sample_cfg = compose("sample", overrides=["sampler=dsno", "sampler.path=x.pt"])
    assert sample_cfg.sampler.path == "x.pt"


def test_resume_keeps_levels_and_refuses_another_m(tmp_path: Path) -> None:
    teacher_path = tiny_teacher_bundle(tmp_path / "teacher.pt")
    common = [
        *tiny_dsno_overrides(teacher_path),
        "trainer=cpu",
        "trainer.limit_val_batches=1",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "logger=csv",
        "+trainer.enable_progress_bar=false",
        "task.grid_every_n_steps=0",
    ]
    train(compose_train([*common, "trainer.max_steps=2"], tmp_path))
    train(compose_train([*common, "trainer.max_steps=3", "ckpt_path=last"], tmp_path))
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 3 and checkpoint["dsno"]["sigmas"][-1] == 0.0
    sampler = DSNOSampler(tmp_path / "checkpoints" / "last.ckpt")  # a .ckpt loads as the EMA operator
    assert sampler.record["extra"]["global_step"] == 3 and sampler.operator.frames == 4
    with pytest.raises(Exception) as excinfo:
        train(compose_train([*common, "trainer.max_steps=4", "ckpt_path=last", "dataset.M=2"], tmp_path))
    assert "task.M=2 but the checkpoint was trained with task.M=4" in str(user_error(excinfo))
