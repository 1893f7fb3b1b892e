"""Restart sampling: exact NFE, reduction to the main solver, the restart jump's variance, error
contraction on an analytic mixture, the VP / discrete-time variant, configs and bad input."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from fastsample.diffusion import CountingDenoiser, DiscreteSchedule, DiscreteVPDenoiser, FunctionDenoiser
from fastsample.models.gmm import GaussianMixture
from fastsample.samplers import SAMPLERS, Sampler, sample_trajectory
from fastsample.samplers.restart import jump, restart_nfe
from fastsample.utils.errors import UserError
from fastsample.utils.instantiation import instantiate
from fastsample.utils.seeding import SeedNoise

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[1]
CIFAR10_VP = [[0.06, 0.30, 2, 3]]
#: the paper's ImageNet-64 configuration (NFE 203 with 36 main steps)
IMAGENET = [
    [19.35, 40.79, 1, 4],
    [1.09, 1.92, 1, 4],
    [0.59, 1.09, 5, 4],
    [0.30, 0.59, 5, 4],
    [0.06, 0.30, 6, 6],
]


def noise_and_generator(seeds, shape=(2,), dtype=torch.float64) -> tuple[torch.Tensor, SeedNoise]:
    generator = SeedNoise(seeds)
    return generator.randn(shape, dtype=dtype), generator


def expected_nfe(solver: str, steps: int, intervals) -> int:
    """Written out independently: Heun costs 2 per step (1 for the last step to 0), others 1."""
    if solver == "heun":
        return (2 * steps - 1) + sum(k * 2 * (n - 1) for _, _, k, n in intervals)
    return steps + sum(k * (n - 1) for _, _, k, n in intervals)


# --- NFE -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", ["heun", "dpmpp_2m", "euler", "unipc"])
@pytest.mark.parametrize(
    ("steps", "intervals"),
    [
        (18, CIFAR10_VP),
        (18, [[0.06, 0.30, 10, 3]]),
        (10, [[0.1, 1.0, 3, 5], {"t_min": 2.0, "t_max": 10.0, "K": 1, "N_restart": 2}]),
        (36, IMAGENET),
        (12, [[0.5, 2.0, 0, 4]]),
    ],
)
def test_nfe_is_counted_exactly(toy_gmm: GaussianMixture, solver: str, steps: int, intervals) -> None:
    counter = CountingDenoiser(toy_gmm)
    noise, generator = noise_and_generator(range(3))
    sampler = Sampler("restart", steps, restart_list=intervals, solver=solver)
    out = sampler.sample(counter, noise, generator=generator)
    assert bool(torch.isfinite(out).all())
    plain = [list(iv.values()) if isinstance(iv, dict) else iv for iv in intervals]
    assert counter.calls == sampler.nfe == expected_nfe(solver, steps, plain)


def test_paper_nfe_values() -> None:
    """The NFE the paper reports for its configurations (CIFAR-10 VP: 43 / 55 / 75; ImageNet: 203)."""
    assert restart_nfe(18, restart_list=CIFAR10_VP) == 43
    assert restart_nfe(18, restart_list=[[0.06, 0.30, 5, 3]]) == 55
    assert restart_nfe(18, restart_list=[[0.06, 0.30, 10, 3]]) == 75
    assert restart_nfe(36, restart_list=IMAGENET) == 203
    assert SAMPLERS["restart"].nfe(18) == 35  # no intervals: Heun
    assert SAMPLERS["heun"].count_nfe(18, {"s_churn": 1.0}) == 35  # plain rules ignore the knobs


@pytest.mark.parametrize(("main", "inner"), [("heun", "dpmpp_2m"), ("dpmpp_2m", "heun"), ("lms", "euler")])
def test_nfe_with_different_main_and_inner_solvers(toy_gmm: GaussianMixture, main: str, inner: str) -> None:
    counter = CountingDenoiser(toy_gmm)
    noise, generator = noise_and_generator(range(2))
    intervals = [[0.1, 0.8, 3, 4], [1.0, 5.0, 2, 3]]
    sampler = Sampler("restart", 15, restart_list=intervals, solver=main, restart_solver=inner)
    sampler.sample(counter, noise, generator=generator)
    main_calls = 2 * 15 - 1 if main == "heun" else 15
    inner_calls = sum(k * (n - 1) * (2 if inner == "heun" else 1) for _, _, k, n in intervals)
    assert counter.calls == sampler.nfe == main_calls + inner_calls


def test_nfe_on_a_grid_ending_above_zero(toy_gmm: GaussianMixture) -> None:
    """ES-DDPM style positive-ending grid: Heun pays 2 per main step; a restart at the last level works."""
    sampler = Sampler("restart", 8, restart_list=[[0.05, 0.5, 2, 3]])
    grid = torch.tensor([5.0, 2.0, 1.0, 0.5, 0.2, 0.1, 0.05], dtype=torch.float64)
    counter = CountingDenoiser(toy_gmm)
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 5
    sampler.run(counter, x, grid, generator=SeedNoise(range(4)))
    assert counter.calls == 2 * 6 + 2 * 2 * (3 - 1)


# --- reduction to the main solver ----------------------------------------------------------------


@pytest.mark.parametrize("solver", ["heun", "dpmpp_2m", "dpmpp_3m", "unipc", "lms"])
@pytest.mark.parametrize("intervals", [None, [], [[0.1, 1.0, 0, 4]], [[0.1, 1.0, 0, 4], [2.0, 9.0, 0, 2]]])
def test_no_restarts_is_exactly_the_main_solver(toy_gmm: GaussianMixture, solver: str, intervals) -> None:
    noise, _ = noise_and_generator(range(8))
    generator = SeedNoise(range(8))
    restart = Sampler("restart", 12, restart_list=intervals, solver=solver).sample(
        toy_gmm, noise, generator=generator
    )
    assert torch.equal(restart, Sampler(solver, 12).sample(toy_gmm, noise))
    # and no noise was drawn: the per-seed streams are untouched
    assert torch.equal(generator.randn((2,)), SeedNoise(range(8)).randn((2,)))


def test_heun_main_process_is_unchanged_by_the_split(toy_gmm: GaussianMixture) -> None:
    """Heun is one-step: splitting the grid at t_min changes nothing before the first restart."""
    sampler = Sampler("restart", 12, restart_list=[[0.3, 1.0, 2, 3]])
    grid = sampler.sigmas(toy_gmm)
    index = int((grid[:-1] - 0.3).abs().argmin())
    noise, generator = noise_and_generator(range(6))
    _, states = sample_trajectory(
        sampler, toy_gmm, noise * 80.0, grid, [float(grid[index - 1])], generator=generator
    )
    heun = Sampler("heun", 12).run(toy_gmm, noise * 80.0, grid[:index])
    assert torch.equal(states[0], heun)


# --- the restart jump ----------------------------------------------------------------------------


def identity_model() -> FunctionDenoiser:
    """D(x) = x: the ODE field is zero, so the output is the start plus the restart jumps alone."""
    return FunctionDenoiser(lambda x, sigma, **_: x, sigma_min=0.002, sigma_max=80.0)


@pytest.mark.parametrize(
    ("solver", "k", "s_noise"), [("heun", 1, 1.0), ("dpmpp_2m", 3, 1.0), ("heun", 2, 1.003)]
)
@pytest.mark.parametrize("renoise", ["ve", "vp"])
def test_restart_noise_has_the_right_variance(solver: str, k: int, s_noise: float, renoise: str) -> None:
    count = 20000
    sampler = Sampler(
        "restart", 18, restart_list=[[0.06, 0.30, k, 3]], solver=solver, s_noise=s_noise, renoise=renoise
    )
    model = identity_model()
    grid = sampler.sigmas(model)
    t_min = float(grid[(grid[:-1] - 0.06).abs().argmin()])
    start = torch.zeros(count, 2, dtype=torch.float64)
    out = sampler.run(model, start, grid, generator=torch.Generator().manual_seed(0))
    expected = k * s_noise**2 * (0.30**2 - t_min**2)
    variance = out.var(dim=0)
    # std error of a sample variance: var * sqrt(2 / n) ~ 1 %; allow 5 sigma
    assert torch.allclose(variance, torch.full_like(variance, expected), rtol=0.05), (variance, expected)
    assert float(out.mean(0).abs().max()) < 5 * math.sqrt(expected / count)


def test_vp_jump_is_the_ve_jump_in_sigma_space() -> None:
    """sqrt(abar2/abar1) x_vp + sqrt(1 - abar2/abar1) eps, mapped back, is x + sqrt(t_max^2 - t_min^2) eps."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=generator, dtype=torch.float64)
    eps = torch.randn(64, 3, generator=generator, dtype=torch.float64)
    for t_min, t_max, s_noise in ((0.06, 0.3, 1.0), (1.0, 40.0, 1.003), (0.002, 80.0, 0.5)):
        ve = jump(x, eps, t_min, t_max, s_noise, "ve")
        vp = jump(x, eps, t_min, t_max, s_noise, "vp")
        torch.testing.assert_close(vp, ve, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ve - x, eps * s_noise * math.sqrt(t_max**2 - t_min**2))


# --- the distribution: restarts contract errors --------------------------------------------------


def mode_weights_error(ring: GaussianMixture, samples: torch.Tensor) -> float:
    """Total variation between the samples' mode occupancy and the ring's uniform weights."""
    angle = torch.atan2(samples[:, 1], samples[:, 0])
    mode = (angle / (2 * math.pi / 8)).round().remainder(8).long()
    weights = torch.bincount(mode, minlength=8).double() / len(samples)
    return float((weights - 1 / 8).abs().sum() / 2)


@pytest.fixture(scope="module")
def ring_reference(ring_gmm: GaussianMixture) -> float:
    reference, _ = ring_gmm.sample(100_000, torch.Generator().manual_seed(3))
    return float(ring_gmm.log_prob(reference).mean())


def test_restart_corrects_a_model_error_made_early(ring_gmm: GaussianMixture, ring_reference: float) -> None:
    """A denoiser that is wrong above sigma = 2 (biased to +x) sends the ODE to the wrong modes; its
    error is made before t_max, so restarts on [0.3, 2] (exact model there) wash it out."""
    shift = torch.tensor([1.0, 0.0], dtype=torch.float64)

    def biased(x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        return ring_gmm(x, sigma, **cond) + shift * (sigma[:, None] > 2.0).to(x.dtype)

    model = FunctionDenoiser(biased, sigma_min=ring_gmm.sigma_min, sigma_max=ring_gmm.sigma_max)
    noise, _ = noise_and_generator(range(4000))
    ode = Sampler("heun", 30).sample(model, noise)
    results = {}
    for k in (1, 8):
        sampler = Sampler("restart", 30, restart_list=[[0.3, 2.0, k, 8]])
        results[k] = sampler.sample(model, noise, generator=SeedNoise(range(4000)))
    # the ODE inherits the bias: mean shifted to +x, modes unevenly filled
    assert float(ode.mean(0)[0]) > 0.4 and mode_weights_error(ring_gmm, ode) > 0.12
    # each restart contracts the error (one: by about a third), eight remove it (to the sampling
    # noise of 4000 samples)
    assert float(results[1].mean(0)[0]) < 0.8 * float(ode.mean(0)[0])
    restarted = results[8]
    assert float(restarted.mean(0).norm()) < 0.06
    assert mode_weights_error(ring_gmm, restarted) < 0.04
    assert abs(float(ring_gmm.log_prob(restarted).mean()) - ring_reference) < 0.1


def test_restart_fixes_coarse_ode_steps(ring_gmm: GaussianMixture, ring_reference: float) -> None:
    """Exact model, 6 main Heun steps: the ODE ends far off the narrow modes; a well-resolved restart
    interval near the end brings the samples back onto them."""
    noise, _ = noise_and_generator(range(4000))
    ode = Sampler("heun", 6).sample(ring_gmm, noise)
    restart = Sampler("restart", 6, restart_list=[[0.3, 2.0, 8, 8]]).sample(
        ring_gmm, noise, generator=SeedNoise(range(4000))
    )
    ode_gap = float(ring_gmm.log_prob(ode).mean()) - ring_reference
    restart_gap = float(ring_gmm.log_prob(restart).mean()) - ring_reference
    assert ode_gap < -5.0
    assert abs(restart_gap) < 0.2
    assert mode_weights_error(ring_gmm, restart) < 0.04


# --- discrete-time models: the VP variant ---------------------------------------------------------


class ExactEps(nn.Module):
    """An exact eps-prediction network of a mixture on a DDPM table: ``net(x_vp, t) -> eps``."""

    def __init__(self, mixture: GaussianMixture, schedule: DiscreteSchedule) -> None:
        super().__init__()
        self.mixture, self.schedule = mixture, schedule

    def forward(self, x_vp: torch.Tensor, t: torch.Tensor, class_labels=None) -> torch.Tensor:
        sigma = self.schedule.t_to_sigma(t).to(x_vp.dtype)
        s = sigma[:, None]
        x = x_vp * (1 + s**2).sqrt()
        return (x - self.mixture(x, sigma)) / s


def test_vp_variant_on_a_discrete_model_stays_on_trained_timesteps(ring_gmm: GaussianMixture) -> None:
    schedule = DiscreteSchedule()
    model = DiscreteVPDenoiser(ExactEps(ring_gmm, schedule), schedule, prediction="eps")
    table = schedule.sigmas.double()
    called: list[float] = []

    def record(x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        called.extend(sigma.unique().tolist())
        return model(x, sigma, **cond)

    recorder = FunctionDenoiser(record, sigma_min=model.sigma_min, sigma_max=model.sigma_max)
    recorder.discrete_sigmas = model.discrete_sigmas
    sampler = Sampler(
        "restart",
        25,
        schedule="time_uniform",
        solver="euler",  # DDIM, as in the paper's Stable Diffusion runs
        restart_list=[[0.3, 2.1, 4, 6]],
        renoise="vp",
        restart_schedule="time_uniform",
    )
    noise, generator = noise_and_generator(range(2000))
    grid = sampler.sigmas(recorder)
    out = sampler.run(recorder, noise * float(grid[0]), grid, generator=generator)
    assert len(called) == sampler.nfe == 25 + 4 * 5
    on_table = [float((table - level).abs().min() / level) < 1e-9 for level in called]
    assert all(on_table), [level for level, ok in zip(called, on_table) if not ok]
    assert 2.1 not in called  # t_max snapped to the table
    # and the samples are good: closer to the data's mean log-likelihood than plain DDIM's
    # (which, on this grid, over-concentrates on the modes) and evenly spread over the modes
    reference, _ = ring_gmm.sample(50_000, torch.Generator().manual_seed(3))
    reference_ll = float(ring_gmm.log_prob(reference).mean())
    ddim = Sampler("euler", 25, schedule="time_uniform").run(model, noise * float(grid[0]), grid)
    gap, ddim_gap = (float(ring_gmm.log_prob(samples).mean()) - reference_ll for samples in (out, ddim))
    assert abs(gap) < 0.25 and abs(gap) < abs(ddim_gap)
    assert mode_weights_error(ring_gmm, out) < 0.05


def test_vp_variant_on_a_continuous_model_is_the_ve_variant(toy_gmm: GaussianMixture) -> None:
    noise, _ = noise_and_generator(range(16))
    runs = [
        Sampler("restart", 18, restart_list=CIFAR10_VP, renoise=renoise).sample(
            toy_gmm, noise, generator=SeedNoise(range(16))
        )
        for renoise in ("ve", "vp")
    ]
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-10, atol=1e-10)


def test_time_uniform_inner_grid_needs_a_discrete_model(toy_gmm: GaussianMixture) -> None:
    noise, generator = noise_and_generator(range(2))
    sampler = Sampler("restart", 10, restart_list=[[0.1, 1.0, 1, 3]], restart_schedule="time_uniform")
    with pytest.raises(UserError, match="restart_schedule='time_uniform' needs a discrete-time model"):
        sampler.sample(toy_gmm, noise, generator=generator)


# --- determinism, trajectories, autograd ---------------------------------------------------------


def test_same_seed_same_sample_whatever_the_batch(ring_gmm: GaussianMixture) -> None:
    seeds = list(range(40))
    sampler = Sampler("restart", 10, restart_list=[[0.1, 1.0, 2, 3], [2.0, 10.0, 1, 3]], solver="dpmpp_2m")

    def run(batch: int, offset: int = 0) -> torch.Tensor:
        outs = []
        for start in range(0, len(seeds), batch):
            chunk = [s + offset for s in seeds[start : start + batch]]
            noise, generator = noise_and_generator(chunk, dtype=torch.float32)
            outs.append(sampler.sample(ring_gmm, noise, generator=generator))
        return torch.cat(outs)

    full = run(40)
    torch.testing.assert_close(run(7), full, rtol=0, atol=1e-6)
    torch.testing.assert_close(run(1), full, rtol=0, atol=1e-6)
    # the restart noise really is drawn: same initial noise, other restart streams, other samples
    noise, _ = noise_and_generator(seeds, dtype=torch.float32)
    other = sampler.sample(ring_gmm, noise, generator=SeedNoise([s + 1000 for s in seeds]))
    assert float((other - full).abs().max()) > 1e-3


def test_trajectory_records_the_restarted_state(toy_gmm: GaussianMixture) -> None:
    """The callback reports the state at t_min after its restarts: the state the main solver
    continues from, equal to a run on the grid cut at t_min (which restarts at its last level)."""
    sampler = Sampler("restart", 12, restart_list=[[0.3, 1.5, 2, 4]])
    grid = sampler.sigmas(toy_gmm)
    index = int((grid[:-1] - 0.3).abs().argmin())
    noise, _ = noise_and_generator(range(5))
    x = noise * float(grid[0])
    final, states = sample_trajectory(
        sampler, toy_gmm, x, grid, [float(grid[index]), 0.0], generator=SeedNoise(range(5))
    )
    assert torch.equal(states[-1], final)
    cut = sampler.run(toy_gmm, x, grid[: index + 1], generator=SeedNoise(range(5)))
    torch.testing.assert_close(states[0], cut, rtol=0, atol=0)
    indices = []
    sampler.run(
        toy_gmm, x, grid, generator=SeedNoise(range(5)), callback=lambda info: indices.append(info["i"])
    )
    assert indices == list(range(12))


def test_gradients_flow_through_restarts(tiny_net_factory) -> None:
    denoiser = tiny_net_factory(torch.float64)
    sampler = Sampler("restart", 4, restart_list=[[0.5, 3.0, 1, 3]])
    z = torch.randn(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    z.requires_grad_(True)
    out = sampler.sample(denoiser, z, generator=SeedNoise([1, 2]), grad=True)
    out.square().sum().backward()
    assert z.grad is not None and float(z.grad.abs().max()) > 0
    assert float(denoiser.net.conv_in.weight.grad.abs().max()) > 0


# --- configs -------------------------------------------------------------------------------------


def compose_sampler(name: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        preset = [f"experiment={name}"] if name != "restart" else []  # paper presets: conf/experiment
        return compose("evaluate", overrides=["sampler=restart", *preset]).sampler


@pytest.mark.parametrize(
    ("name", "nfe"), [("restart", None), ("restart_cifar10_vp", 43), ("restart_imagenet", 203)]
)
def test_configs_instantiate_and_count(toy_gmm: GaussianMixture, name: str, nfe: int | None) -> None:
    sampler = instantiate(compose_sampler(name))
    assert sampler.name == "restart" and isinstance(sampler.knobs["restart_list"], list)
    if nfe is not None:
        assert sampler.nfe == nfe
    counter = CountingDenoiser(toy_gmm)
    noise, generator = noise_and_generator(range(2))
    sampler.sample(counter, noise, generator=generator)
    assert counter.calls == sampler.nfe > 2 * sampler.steps - 1


def test_sampler_object_with_knobs(toy_gmm: GaussianMixture) -> None:
    sampler = Sampler(
        "restart", 10, restart_list=[{"t_min": 0.1, "t_max": 1.0, "K": 2, "N_restart": 3}], solver="dpmpp_2m"
    )
    assert sampler.nfe == 10 + 2 * 2
    assert "nfe=14" in repr(sampler)
    with pytest.raises(UserError, match="sampler.restart is not a setting"):
        Sampler("restart", 10, restart=[[0.1, 1.0, 2, 3]])


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ({"restart_list": [[0.5, 0.5, 1, 3]]}, r"sampler\.restart_list\[0\]\.t_min=0\.5 must be below"),
        ({"restart_list": [[0.1, 1.0, 1, 3], [0.9, 0.3, 1, 3]]}, r"sampler\.restart_list\[1\]\.t_min=0\.9"),
        ({"restart_list": [[0.1, 1.0, -1, 3]]}, r"sampler\.restart_list\[0\]\.K=-1 is out of range"),
        ({"restart_list": [[0.1, 1.0, 1.5, 3]]}, r"sampler\.restart_list\[0\]\.K=1\.5 must be an integer"),
        ({"restart_list": [[0.1, 1.0, 1, 1]]}, r"sampler\.restart_list\[0\]\.N_restart=1 is out of range"),
        ({"restart_list": [[0.0, 1.0, 1, 3]]}, r"sampler\.restart_list\[0\]\.t_min=0\.0 is out of range"),
        ({"restart_list": [[0.1, 90.0, 1, 3]]}, r"sampler\.restart_list\[0\]\.t_max=90\.0 is above"),
        ({"restart_list": [[0.0005, 0.1, 1, 3]]}, r"sampler\.restart_list\[0\]\.t_min=0\.0005 is below"),
        ({"restart_list": [{"t_min": 0.1, "t_max": 1.0, "k": 1, "N_restart": 3}]}, r"unknown keys \['k'\]"),
        (
            {"restart_list": [[0.1, 1.0, 1]]},
            r"sampler\.restart_list\[0\]=\[0\.1, 1\.0, 1\] is not an interval",
        ),
        ({"restart_list": {"t_min": 0.1}}, r"sampler\.restart_list must be a list"),
        (
            {"restart_list": [["a", 1.0, 1, 3]]},
            r"sampler\.restart_list\[0\]\.t_min='a' must be a finite number",
        ),
        ({"restart_list": CIFAR10_VP, "solver": "edm_sde"}, r"sampler\.solver='edm_sde' is not allowed"),
        ({"restart_list": CIFAR10_VP, "restart_solver": "ddpm"}, r"sampler\.restart_solver='ddpm'"),
        (
            {"restart_list": CIFAR10_VP, "renoise": "vq"},
            r"sampler\.renoise='vq' is not allowed; choose one of: ve, vp",
        ),
        ({"restart_list": CIFAR10_VP, "s_noise": -1.0}, r"sampler\.s_noise=-1\.0 is out of range"),
    ],
)
def test_bad_input_names_the_setting(toy_gmm: GaussianMixture, knobs: dict, message: str) -> None:
    noise, generator = noise_and_generator(range(2))
    with pytest.raises(UserError, match=message):
        Sampler("restart", 18, **knobs).sample(toy_gmm, noise, generator=generator)


def test_structural_errors_surface_when_the_sampler_is_built() -> None:
    """Bad intervals or solvers fail when the sampler is built, before any model is loaded."""
    with pytest.raises(UserError, match=r"t_min=2\.0 must be below"):
        Sampler("restart", 18, restart_list=[[2.0, 1.0, 1, 3]])
    with pytest.raises(UserError, match=r"sampler\.solver='ddpm' is not allowed"):
        Sampler("restart", 18, solver="ddpm")
    with pytest.raises(UserError, match=r"sampler\.restart_list\[0\]\.N_restart=0"):
        restart_nfe(18, restart_list=[[0.1, 1.0, 1, 0]])


# --- experiment and Optuna search ----------------------------------------------------------------


class FakeTrial:
    """The part of ``optuna.Trial`` the search-space extender uses (optuna's import is slow)."""

    def __init__(self, params: dict) -> None:
        self.params = dict(params)
        self.ranges: dict = {}

    def suggest_float(self, name: str, low: float, high: float, log: bool = False) -> float:
        self.ranges[name] = (low, high, log)
        self.params[name] = math.sqrt(low * high)
        return self.params[name]


def test_experiment_and_optuna_search_compose_into_valid_samplers() -> None:
    from hydra import compose, initialize_config_dir

    from fastsample.jobs.search_spaces import restart_search_space

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "evaluate",
            overrides=["experiment=restart_fmnist", "hparams_search=restart_optuna"],
            return_hydra_config=True,
        )
        assert cfg.mode == "generate" and cfg.sampler.name == "restart"
        sweeper = cfg.hydra.sweeper
        assert sweeper.direction == "minimize"
        assert sweeper.custom_search_space == "fastsample.jobs.search_spaces.restart_search_space"
        assert set(sweeper.params) == {"sampler.restart_list.0.t_min", "sampler.restart_list.0.K"}
        for t_min in (0.02, 0.3, 2.0):  # t_max follows t_min: every trial is a valid interval
            trial = FakeTrial({"sampler.restart_list.0.t_min": t_min})
            restart_search_space(cfg, trial)
            low, high, log = trial.ranges["sampler.restart_list.0.t_max"]
            assert log and t_min < low <= high <= max(20.0, low)
            overrides = [f"{name}={value}" for name, value in trial.params.items()]
            trial_cfg = compose(
                "evaluate", overrides=["experiment=restart_fmnist", *overrides, "sampler.restart_list.0.K=3"]
            )
            sampler = instantiate(trial_cfg.sampler)
            assert sampler.knobs["restart_list"][0]["t_max"] == trial.params["sampler.restart_list.0.t_max"]
            assert sampler.nfe == 35 + 3 * 2 * 3


# -- the benchmark's report: runs split by curve (one per GPU process) merge into one summary -------


def _load_bench():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "restart_fid_vs_nfe.py"
    spec = importlib.util.spec_from_file_location("restart_bench", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_bench_merge_combines_curves_and_states_the_claims(tmp_path, capsys):
    bench = _load_bench()
    curves = {
        "heun": [("heun", "heun", 21, 0.41), ("heun", "heun", 51, 0.40)],
        "sde": [("edm_sde S_churn=40", "edm_sde", 51, 0.33), ("edm_sde S_churn=40", "edm_sde", 251, 0.28)],
        "restart": [("restart", "restart", 41, 0.38), ("restart", "restart", 95, 0.27)],
    }
    for name, rows in curves.items():
        (tmp_path / name).mkdir()
        records = [
            {
                "sampler": s,
                "family": f,
                "setting": f"NFE {n}",
                "steps": n,
                "nfe": n,
                "fid": fid,
                "sampling_s": n / 10,
            }
            for s, f, n, fid in rows
        ]
        bench.write_csv(tmp_path / name / "restart_fid_vs_nfe.csv", records)
    args, _ = bench.parse_args(
        ["--merge", *(str(tmp_path / name) for name in curves), "--out", str(tmp_path)]
    )
    rows = bench.merge(args)
    assert len(rows) == 6 and {row["family"] for row in rows} == {"heun", "edm_sde", "restart"}
    summary = (tmp_path / "restart_fid_vs_nfe.md").read_text()
    assert "Restart reaches the best SDE FID (0.28 at NFE 251) at NFE 95" in summary
    assert "NFE ratio SDE / Restart = 2.64" in summary
    assert "Restart beats the best ODE FID (0.4 at NFE 51) from NFE 41" in summary
    assert (tmp_path / "restart_fid_vs_nfe.png").stat().st_size > 0
    with pytest.raises(UserError, match="--merge: .* does not exist"):
        bench.merge(bench.parse_args(["--merge", str(tmp_path / "missing")])[0])
