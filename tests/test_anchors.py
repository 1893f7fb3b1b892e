"""Cross-checks against the reference implementations: k-diffusion samplers and schedules, diffusers
DDPM / DDIM schedulers. Same denoiser, same sigmas, same noise -> the same numbers.

k-diffusion runs its samplers on a callable ``model(x, sigma)``; we hand it the float64 Gaussian
mixture. Its stochastic samplers take a ``noise_sampler``; both sides then draw from one list
of pre-drawn tensors (ours through a test-only :class:`ListNoise` generator).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from fastsample.diffusion import DiscreteSchedule, DiscreteVPDenoiser, ScheduleSpec, make_sigmas
from fastsample.models.gmm import GaussianMixture
from fastsample.samplers import Sampler
from fastsample.utils.seeding import SeedNoise

K = pytest.importorskip("k_diffusion.sampling")
pytestmark = pytest.mark.usefixtures("single_thread")

STEPS = 12


class ListNoise(SeedNoise):
    """A generator whose draws come, in order, from a shared list of tensors (test-only)."""

    def __init__(self, draws: list[torch.Tensor]) -> None:
        super().__init__([])
        self.draws = list(draws)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.draws.pop(0).to(x)


def k_noise_sampler(draws: list[torch.Tensor]):
    pending = list(draws)

    def sample(sigma, sigma_next):
        return pending.pop(0)

    sample.pending = pending
    return sample


@pytest.fixture(scope="module")
def setup(single_thread: None) -> dict:
    gmm = GaussianMixture.toy("ring", sigma_min=0.002, sigma_max=80.0)
    sigmas = make_sigmas(ScheduleSpec(kind="karras"), STEPS, gmm)
    x = sigmas[0] * torch.randn(32, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    draws = [
        torch.randn(32, 2, generator=torch.Generator().manual_seed(100 + i), dtype=torch.float64)
        for i in range(STEPS)
    ]
    return {"gmm": gmm, "sigmas": sigmas, "x": x, "draws": draws}


def k_model(gmm: GaussianMixture):
    return lambda x, sigma, **_: gmm(x, sigma)


@pytest.mark.parametrize(
    ("ours", "knobs", "theirs", "their_kwargs", "tolerance"),
    [
        ("euler", {}, "sample_euler", {}, 1e-12),
        ("heun", {}, "sample_heun", {}, 1e-12),
        ("dpmpp_2m", {}, "sample_dpmpp_2m", {}, 1e-12),
        (
            "dpmpp_3m",
            {"anchor_compatible": True},
            "sample_dpmpp_3m_sde",
            {"eta": 0.0, "noise_sampler": lambda *_: None},
            1e-12,
        ),
        ("lms", {"order": 4}, "sample_lms", {"order": 4}, 1e-8),  # k-diffusion integrates with quad
        ("lms", {"order": 2}, "sample_lms", {"order": 2}, 1e-8),
    ],
)
def test_deterministic_samplers_match_k_diffusion(
    setup: dict, ours: str, knobs: dict, theirs: str, their_kwargs: dict, tolerance: float
) -> None:
    gmm, sigmas, x = setup["gmm"], setup["sigmas"], setup["x"]
    mine = Sampler(ours, STEPS, **knobs).run(gmm, x.clone(), sigmas)
    reference = getattr(K, theirs)(k_model(gmm), x.clone(), sigmas, disable=True, **their_kwargs)
    scale = float(reference.abs().max())
    torch.testing.assert_close(mine, reference, rtol=0, atol=tolerance * scale)


def test_default_dpmpp_3m_differs_from_the_anchor(setup: dict) -> None:
    """Our default 3M uses the Taylor-exact second difference, so it must differ from the anchor."""
    gmm, sigmas, x = setup["gmm"], setup["sigmas"], setup["x"]
    mine = Sampler("dpmpp_3m", STEPS).run(gmm, x.clone(), sigmas)
    reference = K.sample_dpmpp_3m_sde(
        k_model(gmm), x.clone(), sigmas, eta=0.0, noise_sampler=lambda *_: None, disable=True
    )
    assert float((mine - reference).abs().max()) > 1e-6


@pytest.mark.parametrize(
    ("ours", "knobs", "theirs", "their_kwargs"),
    [
        ("euler_ancestral", {}, "sample_euler_ancestral", {}),
        ("ddpm", {}, "sample_euler_ancestral", {}),
        (
            "euler_ancestral",
            {"eta": 0.5, "s_noise": 0.9},
            "sample_euler_ancestral",
            {"eta": 0.5, "s_noise": 0.9},
        ),
        ("dpmpp_2m_sde", {}, "sample_dpmpp_2m_sde", {}),
        ("dpmpp_2m_sde", {"solver_type": "heun"}, "sample_dpmpp_2m_sde", {"solver_type": "heun"}),
        ("dpmpp_2m_sde", {"eta": 0.6, "s_noise": 1.1}, "sample_dpmpp_2m_sde", {"eta": 0.6, "s_noise": 1.1}),
    ],
)
def test_stochastic_samplers_match_k_diffusion(
    setup: dict, ours: str, knobs: dict, theirs: str, their_kwargs: dict
) -> None:
    gmm, sigmas, x, draws = setup["gmm"], setup["sigmas"], setup["x"], setup["draws"]
    generator = ListNoise(draws)
    mine = Sampler(ours, STEPS, **knobs).run(gmm, x.clone(), sigmas, generator=generator)
    noise_sampler = k_noise_sampler(draws)
    reference = getattr(K, theirs)(
        k_model(gmm), x.clone(), sigmas, disable=True, noise_sampler=noise_sampler, **their_kwargs
    )
    # both drew one tensor per step except the final one to sigma = 0
    assert len(generator.draws) == len(noise_sampler.pending) == len(draws) - (STEPS - 1)
    torch.testing.assert_close(mine, reference, rtol=0, atol=1e-12 * float(reference.abs().max()))


def test_edm_sde_matches_k_diffusion_heun_with_churn(setup: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """EDM's stochastic sampler: k-diffusion draws noise every step, we only where churn applies."""
    gmm, sigmas, x, draws = setup["gmm"], setup["sigmas"], setup["x"], setup["draws"]
    churn = {"s_churn": 40.0, "s_noise": 1.003}
    levels = sigmas.tolist()
    churned = [draws[i] for i in range(STEPS) if 0.05 <= levels[i] <= 50.0]
    assert 0 < len(churned) < STEPS  # both the gated and the churned branch are exercised
    mine = Sampler("edm_sde", STEPS, s_min=0.05, s_max=50.0, **churn).run(
        gmm, x.clone(), sigmas, generator=ListNoise(churned)
    )
    pending = list(draws)
    monkeypatch.setattr(torch, "randn_like", lambda like, **_: pending.pop(0).to(like))
    reference = K.sample_heun(
        k_model(gmm), x.clone(), sigmas, disable=True, s_tmin=0.05, s_tmax=50.0, **churn
    )
    monkeypatch.undo()
    assert not pending
    torch.testing.assert_close(mine, reference, rtol=0, atol=1e-12 * float(reference.abs().max()))


# --- schedules ------------------------------------------------------------------------------------


@pytest.fixture()
def float64_default():
    """k-diffusion builds its grids with the default dtype; float64 makes them exact to compare."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.mark.parametrize("steps", [1, 2, 10, 40])
def test_karras_matches_k_diffusion(float64_default: None, steps: int) -> None:
    for rho in (3.0, 7.0):
        ours = make_sigmas(ScheduleSpec(kind="karras", sigma_min=0.002, sigma_max=80.0, rho=rho), steps)
        theirs = K.get_sigmas_karras(steps, 0.002, 80.0, rho=rho)
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=0)


@pytest.mark.parametrize("steps", [2, 10, 40])
def test_loglinear_matches_k_diffusion_exponential(float64_default: None, steps: int) -> None:
    ours = make_sigmas(ScheduleSpec(kind="loglinear", sigma_min=0.03, sigma_max=14.6), steps)
    theirs = K.get_sigmas_exponential(steps, 0.03, 14.6)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=0)


@pytest.mark.parametrize("steps", [2, 10, 40])
@pytest.mark.parametrize("eps_s", [1e-3, 1e-2])
def test_vp_matches_k_diffusion(float64_default: None, steps: int, eps_s: float) -> None:
    """k-diffusion parametrizes the VP grid by the end time eps_s (t from 1 to eps_s); map its sigmas."""
    beta_d, beta_min = 19.9, 0.1
    sigma_of = lambda t: math.sqrt(math.exp(beta_d * t**2 / 2 + beta_min * t) - 1)
    spec = ScheduleSpec(kind="vp", sigma_min=sigma_of(eps_s), sigma_max=sigma_of(1.0))
    ours = make_sigmas(spec, steps)
    theirs = K.get_sigmas_vp(steps, beta_d=beta_d, beta_min=beta_min, eps_s=eps_s)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=0)


# --- diffusers ------------------------------------------------------------------------------------

diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize(("ours", "theirs"), [("linear", "linear"), ("cosine", "squaredcos_cap_v2")])
@pytest.mark.parametrize("timesteps", [1000, 250])
def test_discrete_schedule_matches_diffusers(ours: str, theirs: str, timesteps: int) -> None:
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=timesteps, beta_schedule=theirs)
    schedule = DiscreteSchedule(ours, steps=timesteps)
    # diffusers builds the betas (in float64 for the cosine) and stores them in float32
    betas = 1 - schedule.abar / torch.cat([schedule.abar.new_ones(1), schedule.abar[:-1]])
    torch.testing.assert_close(betas.float(), scheduler.betas, rtol=2e-6, atol=1e-9)
    # its cumprod runs in float32: ~1e-6 relative drift, and the cosine's last beta (clamped at
    # 0.999) leaves alpha = 0.001 with a float32 rounding of ~1e-5 relative
    torch.testing.assert_close(schedule.abar.float(), scheduler.alphas_cumprod, rtol=1e-4, atol=0)
    alphas = 1 - betas
    torch.testing.assert_close(alphas, 1 - scheduler.betas.double(), rtol=0, atol=1e-7)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [2, 3, 7, 10, 18, 50, 250, 999, 1000])
def test_time_uniform_matches_diffusers_ddim_timesteps(spacing: str, steps: int) -> None:
    scheduler = diffusers.DDIMScheduler(timestep_spacing=spacing)
    scheduler.set_timesteps(steps)
    table = DiscreteSchedule("linear")
    model = DiscreteVPDenoiser(nn.Identity(), table)
    ours = make_sigmas(ScheduleSpec(kind="time_uniform", spacing=spacing), steps, model)
    torch.testing.assert_close(ours[:-1], table.sigmas[scheduler.timesteps], rtol=0, atol=0)
    assert float(ours[-1]) == 0.0


class TinyEpsNet(nn.Module):
    """A fixed random eps-prediction network on 2-D VP states: ``net(x_vp, t, class_labels)``."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.w1 = nn.Parameter(torch.randn(2, 16, generator=generator, dtype=torch.float64))
        self.w2 = nn.Parameter(0.3 * torch.randn(16, 2, generator=generator, dtype=torch.float64))
        self.freq = nn.Parameter(torch.randn(16, generator=generator, dtype=torch.float64))

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels=None) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1).expand(x.shape[0], 1)
        return torch.tanh(x @ self.w1 + torch.sin(t / 300.0 * self.freq)) @ self.w2


@pytest.mark.parametrize("timestep_mode", ["nearest", "continuous"])
@pytest.mark.parametrize("steps", [10, 25])
def test_ddim_matches_diffusers_step_loop(timestep_mode: str, steps: int) -> None:
    """DDIM (eta = 0) through DiscreteVPDenoiser + our ``ddim`` equals diffusers' DDIMScheduler loop.

    diffusers with ``set_alpha_to_one=True`` steps from t = 0 to abar = 1, i.e. sigma = 0, which is
    exactly our zero-appended 'leading' grid; every intermediate state matches after mapping
    sigma space to VP space (x_vp = x / sqrt(1 + sigma^2)). diffusers' float32 alphas_cumprod is
    replaced by our float64 table (compared separately above) so the match is to rounding.
    """
    net = TinyEpsNet()
    schedule = DiscreteSchedule("linear")
    model = DiscreteVPDenoiser(net, schedule, prediction="eps", timestep=timestep_mode)
    scheduler = diffusers.DDIMScheduler(clip_sample=False, set_alpha_to_one=True, timestep_spacing="leading")
    scheduler.alphas_cumprod = schedule.abar.clone()
    scheduler.set_timesteps(steps)

    x_vp = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    theirs = []
    sample = x_vp
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = net(sample, t.to(torch.float64))
            sample = scheduler.step(eps, int(t), sample, eta=0.0).prev_sample
            theirs.append(sample)

    sampler = Sampler("ddim", steps, schedule=ScheduleSpec(kind="time_uniform", spacing="leading"))
    sigmas = sampler.sigmas(model)
    assert len(sigmas) == len(scheduler.timesteps) + 1
    ours = []
    start = x_vp * (1 + sigmas[0] ** 2).sqrt()  # the VP state mapped to sigma space
    sampler.run(
        model,
        start,
        sigmas,
        callback=lambda info: ours.append(info["x"] / (1 + info["sigma_next"] ** 2).sqrt()),
    )
    for mine, reference in zip(ours, theirs):
        torch.testing.assert_close(mine, reference, rtol=1e-9, atol=1e-9)


def test_ddim_eta_matches_diffusers_with_shared_noise() -> None:
    """DDIM(eta = 0.5): same variance noise on both sides; our sigma_up is diffusers' std_dev_t."""
    net = TinyEpsNet()
    schedule = DiscreteSchedule("linear")
    model = DiscreteVPDenoiser(net, schedule, prediction="eps", timestep="nearest")
    scheduler = diffusers.DDIMScheduler(clip_sample=False, set_alpha_to_one=True)
    scheduler.alphas_cumprod = schedule.abar.clone()
    steps = 8
    scheduler.set_timesteps(steps)
    draws = [
        torch.randn(16, 2, generator=torch.Generator().manual_seed(50 + i), dtype=torch.float64)
        for i in range(steps)
    ]
    x_vp = torch.randn(16, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sample = x_vp
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            eps = net(sample, t.to(torch.float64))
            sample = scheduler.step(eps, int(t), sample, eta=0.5, variance_noise=draws[i]).prev_sample
    sampler = Sampler("ddim", steps, schedule=ScheduleSpec(kind="time_uniform"), eta=0.5)
    sigmas = sampler.sigmas(model)
    out = sampler.run(model, x_vp * (1 + sigmas[0] ** 2).sqrt(), sigmas, generator=ListNoise(draws))
    # the last diffusers step (to abar = 1) has zero variance and its draw is unused on both sides
    torch.testing.assert_close(out, sample, rtol=1e-9, atol=1e-9)


def test_diffusers_set_alpha_to_one_false_stops_at_the_first_table_level() -> None:
    """Documented difference: with set_alpha_to_one=False diffusers' last DDIM step goes from t = 0
    to abar_0, i.e. it returns the state at sigma_0 = 0.0100 without the final denoising; our grid
    ends at sigma = 0. All earlier states are identical (test above)."""
    scheduler = diffusers.DDIMScheduler(clip_sample=False, set_alpha_to_one=False)
    scheduler.set_timesteps(10)
    sample = torch.randn(4, 2, dtype=torch.float64)
    eps = torch.randn(4, 2, dtype=torch.float64)
    assert int(scheduler.timesteps[-1]) == 0
    out = scheduler.step(eps, 0, sample, eta=0.0).prev_sample
    torch.testing.assert_close(out, sample.to(out.dtype), rtol=1e-6, atol=1e-6)
    assert not np.isclose(float(scheduler.final_alpha_cumprod), 1.0)
