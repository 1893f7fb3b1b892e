"""GGDM sampler and DDSS: DDIM at initialization, gradients, the level parametrization, memory with
checkpointing, learned-sampler files (and their refusals), sample.py and train.py task=ddss.

Backbones: the digits mixture of conftest (exact denoiser), the tiny EDM net and a tiny discrete-time
(DDPM eps) net, all on 8x8 images, so everything runs on a CPU in seconds.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from fastsample.diffusion.denoiser import CountingDenoiser
from fastsample.diffusion.discrete import DiscreteVPDenoiser
from fastsample.metrics import kid, mmd2_unbiased
from fastsample.metrics.feature_loss import ddss_loss, image_features, pixel_features, random_conv_features
from fastsample.models.gmm import GaussianMixture
from fastsample.samplers import Sampler
from fastsample.samplers.ggdm import GGDMSampler, load_ggdm
from fastsample.utils.errors import UserError
from fastsample.utils.instantiation import find_user_error
from fastsample.utils.seeding import SeedNoise

ROOT = Path(__file__).resolve().parents[1]
ALL = {"learn_pred": True, "learn_time": True, "learn_noise": True}
NONE = {"learn_pred": False, "learn_time": False, "learn_noise": False}


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """Tiny tensors: extra intra-op threads only slow these tests down on a busy machine."""


def noise_for(shape, seeds=range(12), dtype=torch.float64) -> tuple[torch.Tensor, SeedNoise]:
    source = SeedNoise(list(seeds))
    return source.randn(shape, dtype=dtype), source


def vp_denoiser(tiny_net_factory) -> DiscreteVPDenoiser:
    """A discrete-time eps network (DDPM table) around the tiny net: the other kind of backbone."""
    net = tiny_net_factory(torch.float64, seed=3).net
    return DiscreteVPDenoiser(net, image_shape=(1, 8, 8), num_classes=10)


# -- initialization is DDIM ------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["quadratic", "time_uniform", "karras"])
@pytest.mark.parametrize("flags", [ALL, NONE], ids=["all_learned", "plain"])
def test_init_reproduces_ddim_on_the_same_grid(digits_gmm, schedule, flags):
    steps = 6
    ddim = Sampler("euler", steps, schedule=schedule)
    ggdm = GGDMSampler.from_schedule(digits_gmm, steps, schedule, **flags)
    assert torch.allclose(ggdm.levels(), ddim.sigmas(digits_gmm), rtol=1e-13, atol=0)
    noise, source = noise_for((1, 8, 8))
    expected = ddim.sample(digits_gmm, noise)
    assert (ggdm.sample(digits_gmm, noise, generator=source) - expected).abs().max() < 1e-12
    # the registered DDIM (eta = 0) is the same sampler
    ddim_eta0 = Sampler("ddim", steps, schedule=schedule, eta=0.0).sample(digits_gmm, noise)
    assert (ddim_eta0 - expected).abs().max() < 1e-12
    # float32 state: the float64 coefficients are cast; agreement to float32 rounding (the mixture's
    # sharp denoiser at small sigma amplifies it: float32 DDIM itself is ~1e-5 off float64 DDIM)
    noise32, source32 = noise_for((1, 8, 8), dtype=torch.float32)
    ddim32 = ddim.sample(digits_gmm, noise32)
    rounding = float((ddim32.double() - expected).abs().max())
    gap = float((ggdm.sample(digits_gmm, noise32, generator=source32) - ddim32).abs().max())
    assert gap < max(4 * rounding, 1e-5), (gap, rounding)


@pytest.mark.parametrize("backbone", ["edm", "vp"])
def test_init_reproduces_ddim_with_networks(backbone, tiny_net_factory):
    denoiser = tiny_net_factory(torch.float64) if backbone == "edm" else vp_denoiser(tiny_net_factory)
    labels = torch.arange(12) % 10
    ggdm = GGDMSampler.from_schedule(denoiser, 5, "quadratic")
    counting = CountingDenoiser(denoiser)
    noise, source = noise_for((1, 8, 8))
    cond = {"class_labels": labels}
    ours = ggdm.sample(counting, noise, cond=cond, generator=source)
    assert counting.calls == ggdm.nfe == 5
    expected = Sampler("euler", 5, schedule="quadratic").sample(denoiser, noise, cond=cond)
    assert (ours - expected).abs().max() < 1e-10


# -- gradients -------------------------------------------------------------------------------------


def named_gradients(sampler: GGDMSampler, backbone, checkpoint: bool) -> dict[str, torch.Tensor]:
    sampler.zero_grad()
    real = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    loss = ddss_loss(sampler, backbone, lambda x: x.flatten(1), real, range(16), checkpoint=checkpoint)
    loss.backward()
    return {name: p.grad.clone() for name, p in sampler.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("flags", [ALL, NONE], ids=["all_learned", "plain"])
def test_gradients_reach_every_parameter_and_checkpointing_changes_nothing(tiny_net_factory, flags):
    denoiser = tiny_net_factory(torch.float64).requires_grad_(False)
    sampler = GGDMSampler.from_schedule(denoiser, 4, "karras", **flags)
    names = {name for name, _ in sampler.named_parameters()}
    assert names == {"state_coef", "pred_coef"} | (
        {"noise_param", "time_logits"} if flags["learn_time"] else set()
    )
    plain = named_gradients(sampler, denoiser, checkpoint=False)
    assert set(plain) == names
    for name, grad in plain.items():
        assert torch.isfinite(grad).all(), name
        assert (grad != 0).all(), f"{name}: some entries get no gradient"
    rematerialized = named_gradients(sampler, denoiser, checkpoint=True)
    for name in names:
        assert torch.allclose(rematerialized[name], plain[name], rtol=1e-10, atol=1e-14), name


def test_parameter_counts_follow_the_paper_variants(digits_gmm):
    K = 5
    plain = GGDMSampler.from_schedule(digits_gmm, K, **NONE)
    full = GGDMSampler.from_schedule(digits_gmm, K, **ALL)
    triangle = K * (K + 1) // 2
    assert plain.state_coef.numel() == triangle and plain.pred_coef.numel() == K  # GGDM: nu_kk only
    assert full.pred_coef.numel() == triangle  # +PRED: every earlier prediction
    assert full.time_logits.numel() == K and full.noise_param.numel() == K - 1
    assert GGDMSampler.from_schedule(digits_gmm, 1, **ALL).time_logits is None  # one step: nothing to move


# -- levels: monotone and in range for any parameter values ----------------------------------------


def extreme_logits(steps: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    cases = [
        scale * torch.randn(steps, generator=generator, dtype=torch.float64) for scale in (1, 30, 1e3, 1e6)
    ]
    for index in range(steps):  # one gap takes (almost) everything; the others underflow to 0
        spike = torch.full((steps,), -1e4, dtype=torch.float64)
        spike[index] = 1e4
        cases.append(spike)
    return [*cases, torch.zeros(steps, dtype=torch.float64)]


@pytest.mark.parametrize("steps", [2, 5, 20])
def test_levels_are_monotone_and_in_range_for_any_parameters(digits_gmm, steps):
    sampler = GGDMSampler.from_schedule(digits_gmm, steps, "karras")
    start = float(sampler.init_sigmas[0])
    noise, source = noise_for((1, 8, 8), seeds=range(3))
    for logits in extreme_logits(steps):
        with torch.no_grad():
            sampler.time_logits.copy_(logits)
            sampler.noise_param.copy_(logits[1:] * 10)  # tanh / cosh at extremes: still finite
        levels = sampler.levels().detach()
        assert len(levels) == steps + 1 and float(levels[-1]) == 0.0
        assert float(levels[0]) == start
        assert bool((levels[:-1] > levels[1:]).all()), levels
        assert bool((levels[1:-1] > 0).all()) and bool((levels[1:-1] < start).all())
        _, mu, nu, scale = sampler.coefficients()
        assert torch.isfinite(mu).all() and torch.isfinite(nu).all() and torch.isfinite(scale).all()
        source = SeedNoise(range(3))
        assert torch.isfinite(sampler.sample(digits_gmm, noise, generator=source)).all()


# -- memory of a training step with checkpointing ---------------------------------------------------


class WideNet(nn.Module):
    """Activations ~32x a state per layer: what checkpointing must keep out of the graph."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(1, width, 3, padding=1)
        self.conv_mid = nn.Conv2d(width, width, 3, padding=1)
        self.conv_out = nn.Conv2d(width, 1, 3, padding=1)

    def forward(self, x, noise_labels, class_labels=None):
        hidden = torch.tanh(self.conv_in(x) + noise_labels.reshape(-1, 1, 1, 1))
        return self.conv_out(torch.tanh(self.conv_mid(hidden)))


def training_step_peak_bytes(denoiser, steps: int, checkpoint: bool, batch: int) -> int:
    """Peak CPU memory of one DDSS training step (forward + backward), from the profiler's allocation
    records: each op's own allocations minus frees, accumulated in time order."""
    from torch.profiler import ProfilerActivity, profile

    sampler = GGDMSampler.from_schedule(denoiser, steps, "karras")
    real = torch.randn(batch, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            loss = ddss_loss(
                sampler, denoiser, lambda x: x.flatten(1), real, range(batch), checkpoint=checkpoint
            )
            loss.backward()
            del loss
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


def test_training_step_memory_grows_linearly_in_k_with_checkpointing():
    from fastsample.diffusion import EDMDenoiser

    torch.manual_seed(0)
    batch = 8
    denoiser = EDMDenoiser(WideNet(), image_shape=(1, 16, 16)).requires_grad_(False)
    state = batch * 16 * 16 * 4  # bytes of one float32 state
    ks = (2, 4, 8)
    with_ckpt = {k: training_step_peak_bytes(denoiser, k, True, batch) for k in ks}
    without = {k: training_step_peak_bytes(denoiser, k, False, batch) for k in (2, 8)}
    per_step = (with_ckpt[8] - with_ckpt[2]) / 6
    per_step_without = (without[8] - without[2]) / 6
    # Checkpointed: a few states per step (x_i, D_i, the step noise), not the network's activations.
    assert 0 < per_step <= 8 * state, (with_ckpt, state)
    assert per_step_without > 8 * per_step, (without, with_ckpt)
    # Linear, not quadratic: from K = 4 to 8 memory grows about twice as much as from 2 to 4
    # (a quadratic history, e.g. stacking the states every step, would give 4x).
    first, second = with_ckpt[4] - with_ckpt[2], with_ckpt[8] - with_ckpt[4]
    assert second <= 2.6 * first + state, with_ckpt


# -- files: save / load with the backbone's identity ----------------------------------------------


def test_save_load_round_trip_and_refusals(tmp_path, digits_gmm, digits, tiny_net_factory):
    sampler = GGDMSampler.from_schedule(digits_gmm, 4, "quadratic")
    with torch.no_grad():
        for parameter in sampler.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, dtype=parameter.dtype))
    path = sampler.save(tmp_path / "ggdm.pt", note="test")
    loaded = load_ggdm(path)
    assert loaded.steps == loaded.nfe == 4 and loaded.metadata == {"note": "test"}
    noise, _ = noise_for((1, 8, 8))
    first = sampler.sample(digits_gmm, noise, generator=SeedNoise(range(12)))
    again = loaded.sample(digits_gmm, noise, generator=SeedNoise(range(12)))
    assert torch.equal(first, again)
    assert load_ggdm(path, steps=4).steps == 4

    with pytest.raises(UserError, match=r"learned for K=4 steps, but sampler.steps=5"):
        load_ggdm(path, steps=5)
    images, labels = digits
    other = GaussianMixture.fit(images, labels, rank=4, components_per_class=1)
    for backbone in (other, tiny_net_factory(torch.float64)):
        with pytest.raises(UserError, match=r"was learned for backbone GaussianMixture \[1, 8, 8\]"):
            loaded.sample(backbone, noise, generator=SeedNoise(range(12)))
    with pytest.raises(UserError, match="does not exist"):
        load_ggdm(tmp_path / "missing.pt")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="is not a learned GGDM sampler"):
        load_ggdm(tmp_path / "other.pt")
    own_levels = loaded.sample(digits_gmm, noise, sigmas=loaded.sigmas(), generator=SeedNoise(range(12)))
    assert torch.equal(own_levels, again)  # its own levels may be passed (guidance code does)
    with pytest.raises(UserError, match="levels are learned"):
        loaded.sample(digits_gmm, noise, sigmas=torch.tensor([1.0, 0.0]))


def test_backbone_identity_ignores_precision_and_call_counters(tmp_path, tiny_net_factory):
    float32 = tiny_net_factory(torch.float32)
    sampler = GGDMSampler.from_schedule(float32, 3).save(tmp_path / "ggdm.pt")
    loaded = load_ggdm(sampler)
    noise, _ = noise_for((1, 8, 8), seeds=range(2), dtype=torch.float32)
    loaded.sample(CountingDenoiser(float32), noise, generator=SeedNoise(range(2)))
    loaded.sample(copy.deepcopy(float32).double(), noise.double(), generator=SeedNoise(range(2)))
    changed = copy.deepcopy(float32)
    with torch.no_grad():
        changed.net.conv_out.bias.add_(1e-3)
    with pytest.raises(UserError, match="learned for backbone EDMDenoiser"):
        loaded.sample(changed, noise, generator=SeedNoise(range(2)))


# -- the KID loss and the differentiable features --------------------------------------------------


def test_mmd2_unbiased_is_kid_and_differentiable():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, dtype=torch.float64, generator=generator, requires_grad=True)
    y = torch.randn(40, 6, dtype=torch.float64, generator=generator) + 0.5
    value = mmd2_unbiased(x, y)
    assert float(value.detach()) == pytest.approx(kid(x.detach(), y, subsets=1, subset_size=40)[0], rel=1e-12)
    value.backward()
    assert x.grad.abs().sum() > 0
    # unequal sizes: the unbiased estimate averages to 0 for one distribution
    draws = [
        mmd2_unbiased(torch.randn(6, 3, generator=generator), torch.randn(9, 3, generator=generator))
        for _ in range(400)
    ]
    values = torch.stack(draws)
    assert abs(float(values.mean())) < 4 * float(values.std()) / 20


@pytest.mark.parametrize(
    "extractor", [pixel_features(), random_conv_features(seed=2)], ids=["pixels", "conv"]
)
def test_image_features_are_the_extractors_features(extractor):
    # on the uint8 grid the extractor's rounding changes nothing, so the two paths agree
    levels = torch.randint(0, 256, (6, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    images = levels.float() / 127.5 - 1
    expected = extractor(images)["features"]
    ours = image_features(extractor, images.requires_grad_())
    assert torch.allclose(ours, expected, atol=1e-5)
    ours.sum().backward()
    assert images.grad.abs().sum() > 0


def test_ddss_improves_a_two_step_sampler_on_the_ring(ring_gmm):
    """A few Adam steps of DDSS on the 8-mode ring: the held-out KID (other seeds, fresh exact samples)
    drops well below DDIM's at the same K."""
    sampler = GGDMSampler.from_schedule(ring_gmm, 2, "karras")
    features = lambda x: x  # noqa: E731  (2-D data: the points themselves)
    eval_noise, eval_source = noise_for((2,), seeds=range(10**6, 10**6 + 2000))
    truth, _ = ring_gmm.sample(2000, torch.Generator().manual_seed(7))

    def held_out() -> float:
        with torch.no_grad():
            samples = sampler.sample(ring_gmm, eval_noise, generator=SeedNoise(eval_source.seeds))
        return kid(samples, truth, subsets=5, subset_size=1000)[0]

    before = held_out()
    optimizer = torch.optim.Adam(sampler.parameters(), lr=0.05)
    for step in range(60):
        real, _ = ring_gmm.sample(256, torch.Generator().manual_seed(step))
        loss = ddss_loss(
            sampler, ring_gmm, features, real, range(step * 256, (step + 1) * 256), checkpoint=False
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = held_out()
    assert after < 0.5 * before, (before, after)


# -- entry points: sample.py sampler=ggdm, train.py task=ddss ---------------------------------------


def compose_config(name: str, tmp_path: Path, *overrides: str):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose(
            name,
            overrides=[f"paths.output_dir={tmp_path}/out", f"paths.cache_dir={tmp_path}/cache", *overrides],
        )


def test_sample_py_runs_a_learned_sampler_and_refuses_another_backbone(tmp_path):
    from fastsample.jobs.sampling import generate
    from fastsample.jobs.setup import build_model

    path = tmp_path / "ggdm.pt"
    overrides = ["model=gmm_digits", "seeds=0-9", "device=cpu"]  # writes under <tmp_path>/out
    cfg = compose_config("sample", tmp_path, *overrides, "sampler=ggdm", f"sampler.path={path}")
    GGDMSampler.from_schedule(build_model(cfg, torch.device("cpu")), 3, "quadratic").save(path)
    summary = generate(cfg)
    assert summary["sampler"] == "ggdm" and summary["nfe"] == summary["steps"] == 3
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["schedule"] == "ggdm" and run["knobs"]["path"] == str(path)

    other = compose_config(
        "sample", tmp_path / "b", *overrides, "sampler=ggdm", f"sampler.path={path}", "model.rank=4"
    )
    with pytest.raises(Exception) as excinfo:
        generate(other)
    error = find_user_error(excinfo.value)
    assert error is not None and f"sampler.path={str(path)!r} was learned for backbone" in str(error)
    wrong_k = compose_config(
        "sample", tmp_path / "c", *overrides, "sampler=ggdm", f"sampler.path={path}", "sampler.steps=5"
    )
    with pytest.raises(Exception) as excinfo:
        generate(wrong_k)
    assert "learned for K=3 steps" in str(find_user_error(excinfo.value))


@pytest.mark.filterwarnings("ignore:covariance of .* is singular", "ignore:Found .* module.*in eval mode")
def test_train_task_ddss_fast_dev_run_writes_a_loadable_sampler(tmp_path):
    from fastsample.jobs.training import train

    cfg = compose_config(
        "train",
        tmp_path,
        "dataset=digits",
        "dataset.batch_size=32",
        "dataset.subset=64",
        "dataset.val_subset=32",
        "task=ddss",
        "model@task.model=gmm_digits",
        "task.steps=3",
        "task.eval_samples=32",
        "task.eval_reference_samples=64",
        "trainer=debug",
        "callbacks.sample_grid=null",
    )
    metrics = train(cfg)
    assert {"train/kid", "val/fid", "val/kid", "val/kid_optimized", "val/loglik"} <= set(metrics)
    sampler = load_ggdm(tmp_path / "out" / "ggdm.pt", steps=3)
    meta = sampler.metadata
    assert meta["train_steps"] == 1 and meta["loss_features"].startswith("pixels:")
    assert meta["eval_features"].startswith("random_conv0:") and "fid" in meta["init_scores"]
    assert sampler.backbone["description"]["class"] == "GaussianMixture"


def test_bad_task_settings_fail_with_the_setting_named(tmp_path):
    from fastsample.lit.ddss import DDSSModule

    cfg = compose_config("train", tmp_path, "dataset=digits", "task=ddss", "model@task.model=gmm_digits")
    for setting, value in (("steps", 0), ("lr", 0.0)):
        with pytest.raises(UserError, match=f"task.{setting}"):
            DDSSModule(**{**{k: v for k, v in cfg.task.items() if k != "_target_"}, setting: value})


@pytest.mark.parametrize(
    ("experiment", "target"),
    [
        ("ddss_fmnist", "fastsample.lit.loading.classifier_features"),
        ("ddss_fmnist_k5", "fastsample.lit.loading.classifier_features"),
        ("ddss_fmnist_random_features", "fastsample.metrics.feature_loss.random_conv_features"),
    ],
)
def test_ddss_experiments_pick_their_loss_features(tmp_path, experiment, target):
    from fastsample.utils.instantiation import instantiate

    cfg = compose_config("train", tmp_path, f"experiment={experiment}")
    assert cfg.task.loss_features._target_ == target
    assert callable(instantiate(cfg.task.loss_features))  # the group's keys fit the function
