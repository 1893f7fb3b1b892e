"""ES-DDPM: the reduction to the ordinary sampler at T' = T, the diffused prior's marginal, NFE,
per-seed priors, the truncated grids, generators (.npz, mixture, callable), edits, configs and bad input.

The exact equivalence tested at T' = T with a Gaussian prior ``x0' ~ N(0, s^2 I)``:
ES-DDPM starts from ``x_T = sigma_T eps + s z'`` where the ordinary sampler starts from ``sigma_T eps``
(same ``eps``: the prior draws ``z'`` from its own per-seed streams, so the sampler's streams, the
diffusion noise and every ancestral step's noise, are the ordinary sampler's). Hence

* ``s = 0``: ES-DDPM *is* the ordinary sampler, bit for bit, for every solver (stochastic ones too);
* ``s > 0`` on Gaussian data ``N(m, c I)``: every DDIM / DDPM step is affine in the state with the
  same additive noise, so the outputs differ by exactly ``B s z'`` with
  ``B = prod_i (c + sigma_i sigma'_i) / (c + sigma_i^2)`` (``sigma'_i`` = the next level for DDIM, the
  ancestral ``sigma_down`` for DDPM; 0 on the last step). ``B ~ 1e-3`` at sigma_T = 157: the prior's
  influence vanishes, which is what "reduces to the ordinary sampler" means.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from fastsample.diffusion import CountingDenoiser, DiscreteSchedule, DiscreteVPDenoiser
from fastsample.models.gmm import GaussianMixture
from fastsample.samplers import Sampler
from fastsample.samplers.es_ddpm import (
    ESDDPMSampler,
    diffuse,
    sample_es_ddpm,
    t_prime_sigma,
    truncated_timesteps,
)
from fastsample.samplers.priors import (
    PRIOR_STREAM_OFFSET,
    GaussianGenerator,
    LatentGenerator,
    MixtureGenerator,
    NpzGenerator,
    as_generator,
    box_mask,
    callable_generator,
    interpolate_latents,
    mask_edit,
    paste,
)
from fastsample.samplers.sde import ancestral_split
from fastsample.utils.errors import NumericalError, UserError
from fastsample.utils.images import to_uint8
from fastsample.utils.instantiation import find_user_error, instantiate
from fastsample.utils.seeding import SeedNoise

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[1]
LINEAR = DiscreteSchedule("linear", 1000).sigmas  # what T' means for continuous models


def gaussian_data(c: float = 0.25, mean=(0.3, -0.2)) -> GaussianMixture:
    """One isotropic Gaussian N(m, c I) in 2-D: an exact denoiser affine in x."""
    return GaussianMixture(
        torch.ones(1),
        torch.tensor([mean], dtype=torch.float64),
        torch.eye(2, dtype=torch.float64)[None],
        torch.full((1, 2), c, dtype=torch.float64),
        torch.tensor([c], dtype=torch.float64),
        data_shape=(2,),
    )


class MixtureEpsNet(nn.Module):
    """A discrete-time eps network that is exact for a mixture: ``net(x_vp, t) -> eps``."""

    def __init__(self, mixture: GaussianMixture, schedule: DiscreteSchedule) -> None:
        super().__init__()
        self.mixture, self.schedule = mixture, schedule

    def forward(self, x_vp: torch.Tensor, t: torch.Tensor, class_labels=None) -> torch.Tensor:
        sigma = self.schedule.t_to_sigma(t).to(x_vp)
        s = sigma.reshape(-1, *[1] * (x_vp.ndim - 1))
        x = x_vp * (1 + s**2).sqrt()
        return (x - self.mixture(x, sigma)) / s


def discrete_model(mixture: GaussianMixture, kind: str = "linear", steps: int = 1000) -> DiscreteVPDenoiser:
    schedule = DiscreteSchedule(kind, steps)
    return DiscreteVPDenoiser(MixtureEpsNet(mixture, schedule), schedule, image_shape=mixture.image_shape)


def noise_for(seeds, shape, dtype=torch.float64) -> tuple[torch.Tensor, SeedNoise]:
    generator = SeedNoise(seeds)
    return generator.randn(shape, dtype=dtype), generator


def es(solver="ddpm", steps=10, t_prime=1000, prior=None, schedule=None, **knobs) -> ESDDPMSampler:
    schedule = schedule or {"kind": "time_uniform", "spacing": "linspace"}
    return ESDDPMSampler(steps=steps, schedule=schedule, solver=solver, t_prime=t_prime, prior=prior, **knobs)


def user_error(excinfo: pytest.ExceptionInfo) -> str:
    error = find_user_error(excinfo.value)
    assert error is not None, f"expected a UserError, got {excinfo.value!r}"
    return str(error)


# --- T' and the truncated grid -------------------------------------------------------------------


def test_t_prime_means_the_same_level_for_continuous_and_linear_ddpm_models(toy_gmm) -> None:
    linear = discrete_model(toy_gmm, "linear")
    for t_prime in (1, 50, 100, 200, 400, 1000):
        expected = float(LINEAR[t_prime - 1])
        assert es(t_prime=t_prime).start_sigma(toy_gmm) == expected  # EDM-style: read on the linear table
        assert es(t_prime=t_prime).start_sigma(linear) == expected
    assert math.isclose(t_prime_sigma(100, LINEAR), 0.33883, rel_tol=1e-4)
    cosine = discrete_model(toy_gmm, "cosine")  # a discrete model's own table
    assert es(t_prime=100).start_sigma(cosine) == float(cosine.discrete_sigmas[99])
    assert es(sigma_start=0.7, schedule={"kind": "karras"}).start_sigma(toy_gmm) == 0.7


@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
@pytest.mark.parametrize("steps", [1, 7, 10, 100, 1000])
def test_full_length_grid_is_the_ordinary_time_uniform_grid(toy_gmm, spacing: str, steps: int) -> None:
    for model in (discrete_model(toy_gmm), toy_gmm):
        ordinary = Sampler("ddpm", steps, {"kind": "time_uniform", "spacing": spacing}).sigmas(model)
        truncated = es(steps=steps, schedule={"kind": "time_uniform", "spacing": spacing}).sigmas(model)
        if steps == 1 and model is toy_gmm:
            # the ordinary 1-step grid of a continuous model starts at its sigma_max, ES-DDPM at sigma(T)
            assert truncated.tolist() == [float(LINEAR[-1]), 0.0]
            continue
        assert torch.equal(truncated, ordinary)


@pytest.mark.parametrize("t_prime", [50, 100, 400])
def test_truncated_grids_start_at_sigma_t_prime(toy_gmm, t_prime: int) -> None:
    steps = 25
    grid = es(steps=steps, t_prime=t_prime).sigmas(toy_gmm)
    timesteps = truncated_timesteps(steps, t_prime)
    assert len(grid) == steps + 1 and float(grid[-1]) == 0.0
    assert int(timesteps[0]) == t_prime - 1 and int(timesteps[-1]) == 0
    assert float(grid[0]) == float(LINEAR[t_prime - 1]) and float(grid[-2]) == float(LINEAR[0])
    assert bool((grid[:-1] > grid[1:]).all())
    trailing = truncated_timesteps(steps, t_prime, "trailing")
    assert int(trailing[0]) == t_prime - 1 and len(set(trailing.tolist())) == steps
    karras = es(steps=steps, t_prime=t_prime, schedule={"kind": "karras"}).sigmas(toy_gmm)
    assert math.isclose(float(karras[0]), float(LINEAR[t_prime - 1])) and math.isclose(
        float(karras[-2]), 0.02
    )


# --- the reduction to the ordinary sampler at T' = T ----------------------------------------------


@pytest.mark.parametrize("solver", ["ddpm", "ddim", "heun"])
def test_zero_std_gaussian_prior_at_t_equal_T_is_the_ordinary_sampler(toy_gmm, solver: str) -> None:
    """s = 0: bit-identical (the prior's draws never touch the sampler's per-seed streams)."""
    model = discrete_model(toy_gmm)
    seeds = range(6)
    schedule = {"kind": "time_uniform", "spacing": "linspace"}
    noise, generator = noise_for(seeds, (2,))
    ordinary = Sampler(solver, 12, schedule).sample(model, noise, generator=generator)
    noise, generator = noise_for(seeds, (2,))
    early = es(solver, 12, 1000, GaussianGenerator(std=0.0), schedule).sample(
        model, noise, generator=generator
    )
    assert torch.equal(early, ordinary)


@pytest.mark.parametrize("solver", ["ddim", "ddpm"])
def test_small_gaussian_prior_at_t_equal_T_differs_by_the_propagated_prior(solver: str) -> None:
    """s > 0 on Gaussian data: ES - ordinary = B s z' exactly (see the module docstring)."""
    c, s, steps = 0.25, 0.05, 20
    data = gaussian_data(c)
    seeds = list(range(5))
    schedule = {"kind": "time_uniform", "spacing": "linspace"}
    noise, generator = noise_for(seeds, (2,))
    ordinary = Sampler(solver, steps, schedule).sample(data, noise, generator=generator)
    sampler = es(solver, steps, 1000, GaussianGenerator(std=s), schedule)
    noise, generator = noise_for(seeds, (2,))
    early = sampler.sample(data, noise, generator=generator)

    grid = sampler.sigmas(data)
    gain = 1.0
    for i in range(steps):
        sigma, following = grid[i], grid[i + 1]
        if float(following) == 0.0:
            nxt = 0.0
        else:
            nxt = float(ancestral_split(sigma, following, 1.0)[0]) if solver == "ddpm" else float(following)
        gain *= (c + float(sigma) * nxt) / (c + float(sigma) ** 2)
    z_prior = SeedNoise([(seed + PRIOR_STREAM_OFFSET) % 2**32 for seed in seeds]).randn(
        (2,), dtype=torch.float64
    )
    assert 1e-6 < gain < 1e-2  # the prior's trace from sigma_T = 157 is tiny
    torch.testing.assert_close(early - ordinary, gain * s * z_prior, rtol=1e-9, atol=1e-12)


def test_gaussian_prior_at_t_equal_T_samples_what_the_ordinary_sampler_samples(ring_gmm) -> None:
    """In distribution (independent noise): DDPM from T' = T with a N(0, 0.1^2) prior matches DDPM."""
    count, schedule = 2000, {"kind": "time_uniform", "spacing": "linspace"}
    outputs = []
    for seed, sampler in (
        (0, es("ddpm", 100, 1000, GaussianGenerator(std=0.1), schedule)),
        (1, Sampler("ddpm", 100, schedule)),
    ):
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(count, 2, generator=generator, dtype=torch.float64)
        outputs.append(sampler.sample(ring_gmm, noise, generator=generator))
    early, ordinary = outputs
    assert float((early.mean(0) - ordinary.mean(0)).norm()) < 0.15
    assert abs(float(ring_gmm.log_prob(early).mean() - ring_gmm.log_prob(ordinary).mean())) < 0.1
    assert float((early.T.cov() - ordinary.T.cov()).abs().max()) < 0.25


# --- the diffused prior ----------------------------------------------------------------------------


@pytest.mark.parametrize("t_prime", [50, 200, 1000])
def test_diffused_prior_has_the_kernel_marginal(toy_gmm, t_prime: int) -> None:
    """x_T' = x0' + sigma eps: Var = Var(x0') + sigma^2 (sigma space); abar Var(x0') + 1 - abar (VP).

    The prior is non-Gaussian on purpose: x0' = +-0.8 (a fair sign per coordinate), variance 0.64.
    """
    count, level = 6000, 0.8
    prior = LatentGenerator(lambda z: level * torch.sign(z), 2, image_shape=(2,))
    sampler = es(t_prime=t_prime, prior=prior)
    sigma = sampler.start_sigma(toy_gmm)
    noise, generator = noise_for(range(count), (2,))
    x = sampler.start_state(noise, sigma, generator=generator)
    data_var = level**2
    expected = data_var + sigma**2
    tolerance = 5 * math.sqrt(2 * sigma**4 + 4 * sigma**2 * data_var) / math.sqrt(count)  # 5 standard errors
    assert float((x.var(0) - expected).abs().max()) < tolerance
    assert float(x.mean(0).abs().max()) < 5 * math.sqrt(expected / count)
    abar = 1 / (1 + sigma**2)
    vp = x * math.sqrt(abar)
    assert float((vp.var(0) - (abar * data_var + 1 - abar)).abs().max()) < tolerance * abar
    assert abs(float(torch.corrcoef(x.T)[0, 1])) < 5 / math.sqrt(count)
    # the prior really is the +-0.8 one (the kernel adds noise to it, nothing else)
    torch.testing.assert_close(prior.sample(4, SeedNoise(range(4))).abs(), torch.full((4, 2), level))


def test_naive_truncation_prior_is_pure_vp_noise(toy_gmm) -> None:
    """A N(0, I) prior diffused to any T' is N(0, I) in the VP state x / sqrt(1 + sigma^2)."""
    count = 6000
    for t_prime in (100, 400):
        sampler = es(t_prime=t_prime, prior=GaussianGenerator(std=1.0))
        sigma = sampler.start_sigma(toy_gmm)
        noise, generator = noise_for(range(count), (2,))
        vp = sampler.start_state(noise, sigma, generator=generator) / math.sqrt(1 + sigma**2)
        assert float((vp.var(0) - 1).abs().max()) < 5 * math.sqrt(2 / count)


# --- NFE and per-seed randomness --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("solver", "schedule", "expected"),
    [
        ("ddpm", "time_uniform", lambda n: n),
        ("ddim", "time_uniform", lambda n: n),
        ("heun", "karras", lambda n: 2 * n - 1),
        ("dpmpp_2m", "karras", lambda n: n),
    ],
)
@pytest.mark.parametrize("steps", [1, 4, 25])
def test_nfe_is_counted(toy_gmm, solver: str, schedule: str, expected, steps: int) -> None:
    counter = CountingDenoiser(toy_gmm)
    sampler = es(solver, steps, 100, MixtureGenerator(toy_gmm), {"kind": schedule, "spacing": "linspace"})
    noise, generator = noise_for(range(3), (2,))
    out = sampler.sample(counter, noise, generator=generator)
    assert out.shape == noise.shape and bool(torch.isfinite(out).all())
    assert counter.calls == sampler.nfe == expected(steps)


def test_per_seed_priors_do_not_depend_on_the_batch(digits_gmm) -> None:
    prior = MixtureGenerator(digits_gmm)
    sampler = es("ddpm", 8, 200, prior)
    seeds = list(range(6))
    noise, generator = noise_for(seeds, (1, 8, 8))
    whole = sampler.sample(digits_gmm, noise, generator=generator)
    parts = []
    for chunk in (seeds[:2], seeds[2:]):
        noise, generator = noise_for(chunk, (1, 8, 8))
        parts.append(sampler.sample(digits_gmm, noise, generator=generator))
    torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-12, atol=1e-12)
    first = prior.sample(3, SeedNoise([0, 1, 2]), dtype=torch.float64)
    again = prior.sample(3, SeedNoise([0, 1, 2]), dtype=torch.float64)
    other = prior.sample(3, SeedNoise([3, 4, 5]), dtype=torch.float64)
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_class_labels_reach_a_mixture_prior(digits_gmm) -> None:
    prior = MixtureGenerator(digits_gmm)
    labels = torch.tensor([3] * 64)
    images = prior.sample(64, SeedNoise(range(64)), dtype=torch.float64, class_labels=labels)
    predicted = digits_gmm.class_log_posterior(images, 0.02).argmax(1)
    assert float((predicted == 3).double().mean()) > 0.9


# --- generators ----------------------------------------------------------------------------------


def test_npz_prior_from_sample_py_output_follows_seeds(tmp_path: Path) -> None:
    images = torch.rand(10, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    seeds = np.array([7, 3, 9, 0, 1, 2, 4, 5, 6, 8])
    np.savez(tmp_path / "samples.npz", images=to_uint8(images), labels=np.full(10, -1), seeds=seeds)
    prior = NpzGenerator(tmp_path / "samples.npz")
    assert prior.image_shape == (1, 8, 8)
    picked = prior.sample(3, SeedNoise([3, 7, 8]))
    expected = torch.from_numpy(to_uint8(images)[[1, 0, 9]]).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert torch.equal(picked, expected)
    with pytest.raises(UserError, match="no sample for seed 11"):
        prior.sample(1, SeedNoise([11]))
    # float (N, C, H, W) without seeds: seed k is row k
    np.savez(tmp_path / "float.npz", arr_0=images.numpy())
    floats = NpzGenerator(tmp_path / "float.npz")
    assert torch.equal(floats.sample(2, SeedNoise([4, 2])), images[[4, 2]])
    with pytest.raises(UserError, match="holds 10 samples.*seed 10"):
        floats.sample(1, SeedNoise([10]))
    assert floats.sample(5, torch.Generator().manual_seed(0)).shape == (5, 1, 8, 8)


def test_npz_prior_bad_files(tmp_path: Path) -> None:
    np.savez(tmp_path / "keys.npz", pictures=np.zeros((2, 8, 8, 1), np.uint8), labels=np.zeros(2))
    with pytest.raises(UserError, match="no 'images' or 'arr_0' array.*has: pictures, labels"):
        NpzGenerator(tmp_path / "keys.npz")
    with pytest.raises(UserError, match="does not exist"):
        NpzGenerator(tmp_path / "absent.npz")
    np.savez(tmp_path / "range.npz", images=np.full((2, 1, 8, 8), 3.0, np.float32))
    with pytest.raises(UserError, match=r"\[-1, 1\]"):
        NpzGenerator(tmp_path / "range.npz")
    np.savez(tmp_path / "seeds.npz", images=np.zeros((2, 8, 8, 1), np.uint8), seeds=np.arange(3))
    with pytest.raises(UserError, match="'seeds' has 3 entries for 2 images"):
        NpzGenerator(tmp_path / "seeds.npz")
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not a readable .npz"):
        NpzGenerator(tmp_path / "broken.npz")


def test_callable_prior_and_its_shape() -> None:
    decoder = nn.Sequential(nn.Linear(3, 64), nn.Tanh(), nn.Unflatten(1, (1, 8, 8)))
    prior = callable_generator(decoder, [3])
    assert prior.image_shape == (1, 8, 8) and prior.latent_shape == (3,)
    images = prior.sample(4, SeedNoise(range(4)))
    assert images.shape == (4, 1, 8, 8) and float(images.abs().max()) <= 1.0
    z = prior.latents(4, SeedNoise(range(4)))
    torch.testing.assert_close(prior.decode(z), images)
    with pytest.raises(UserError, match="must return a batch of images"):
        LatentGenerator(lambda z: z.sum(), 3, image_shape=(1, 8, 8)).sample(2)


# --- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize("t_prime", [0, -5, 1001, 2.5, True, float("nan")])
def test_t_prime_outside_the_chain(toy_gmm, t_prime) -> None:
    with pytest.raises(UserError) as excinfo:
        es(t_prime=t_prime, prior=GaussianGenerator()).sigmas(toy_gmm)
    message = str(excinfo.value)
    assert "sampler.t_prime" in message and "(0, " in message
    if t_prime == 1001:
        assert "(0, 1000]" in message


def test_t_prime_beyond_a_short_discrete_schedule(toy_gmm) -> None:
    model = discrete_model(toy_gmm, "linear", steps=100)
    assert es(steps=10, t_prime=100).sigmas(model)[0] == model.discrete_sigmas[-1]
    with pytest.raises(UserError, match=r"sampler.t_prime=101 .*\(0, 100\].*T = 100"):
        es(steps=10, t_prime=101).sigmas(model)


def test_prior_shape_must_match_the_model(toy_gmm, digits_gmm) -> None:
    sampler = es(t_prime=100, prior=MixtureGenerator(digits_gmm))  # (1, 8, 8) images
    noise, generator = noise_for(range(2), (2,))
    with pytest.raises(UserError, match=r"shape \(1, 8, 8\) but the model's data shape is \(2\)"):
        sampler.sample(toy_gmm, noise, generator=generator)
    sized = es(t_prime=100, prior=GaussianGenerator(image_shape=(1, 28, 28)))
    noise, generator = noise_for(range(2), (1, 8, 8))
    with pytest.raises(UserError, match=r"\(1, 28, 28\) but the model's data shape is \(1, 8, 8\)"):
        sized.sample(digits_gmm, noise, generator=generator)


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"steps": 200, "t_prime": 100}, "sampler.steps=200 exceeds sampler.t_prime=100"),
        ({"solver": "nope"}, "sampler.solver='nope' is not allowed; choose one of: .*ddim"),
        ({"solver": "es_ddpm"}, "sampler.solver=es_ddpm is not allowed"),
        ({"t_prime": None}, "both null"),
        ({"sigma_start": 0.5}, "sigma_start needs a continuous schedule"),
        ({"schedule": {"kind": "karras", "sigma_max": 3.0}}, "sigma_max is set by ES-DDPM"),
        ({"schedule": {"kind": "time_uniform", "spacing": "leading"}}, "spacing='leading' is not allowed"),
        ({"bogus": 1.0}, "sampler.bogus is not a setting of sampler 'ddpm'"),
    ],
)
def test_bad_settings(toy_gmm, settings: dict, match: str) -> None:
    with pytest.raises(UserError, match=match):
        ESDDPMSampler(**{"steps": 10, "prior": GaussianGenerator(), **settings}).sigmas(toy_gmm)


class Alternating:
    """Finite but huge model outputs of alternating sign: the multistep extrapolation overflows."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.full_like(x, 3e38 * (-1) ** self.calls)


def continuous_es(solver: str, steps: int) -> ESDDPMSampler:
    """ES-DDPM from sigma 10 on a zero-std prior (the start state is ``10 * noise``)."""
    return ESDDPMSampler(
        steps=steps,
        schedule="karras",
        solver=solver,
        t_prime=None,
        sigma_start=10.0,
        prior=GaussianGenerator(std=0.0),
    )


def test_non_finite_state_names_the_step() -> None:
    """ES-DDPM runs its solver through the guarded BaseSampler.run, as the registry sampler does."""
    sigmas = torch.tensor([10.0, 4.0, 1.0, 0.2, 0.0])
    noise, generator = noise_for(range(4), (2,), torch.float32)
    with pytest.raises(NumericalError, match=r"sampler state became non-finite at step 1 \(sigma 4 -> 1\)"):
        continuous_es("dpmpp_2m", 4).sample(Alternating(), noise, generator=generator, sigmas=sigmas)
    x = torch.zeros(4, 2)
    with pytest.raises(NumericalError, match=r"non-finite at step 1 \(sigma 4 -> 1\)"):
        continuous_es("dpmpp_2m", 4).run(Alternating(), x, sigmas)


def test_model_returning_nan_names_the_sigma() -> None:
    def broken(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return torch.where(sigma[:, None] < 2.0, torch.full_like(x, float("nan")), torch.zeros_like(x))

    sigmas = torch.tensor([10.0, 4.0, 1.0, 0.2, 0.0])
    noise, generator = noise_for(range(2), (2,))
    with pytest.raises(NumericalError, match=r"non-finite values at call 3 \(sigma=1\)"):
        continuous_es("euler", 4).sample(broken, noise, generator=generator, sigmas=sigmas)


def test_missing_prior_and_mismatched_explicit_grid(toy_gmm) -> None:
    noise, generator = noise_for(range(2), (2,))
    with pytest.raises(UserError, match="sampler.prior is not set"):
        es(t_prime=100).sample(toy_gmm, noise, generator=generator)
    explicit = {"kind": "explicit", "sigmas": [1.0, 0.5, 0.0]}
    with pytest.raises(UserError, match="set sampler.sigma_start=1"):
        es(steps=2, t_prime=100, schedule=explicit).sigmas(toy_gmm)
    assert es(steps=2, t_prime=None, sigma_start=1.0, schedule=explicit).sigmas(toy_gmm).tolist() == [
        1.0,
        0.5,
        0.0,
    ]


# --- control --------------------------------------------------------------------------------------


def test_latent_interpolation_and_pixel_edits() -> None:
    z0, z1 = torch.randn(2, 5, generator=torch.Generator().manual_seed(0)).unbind(0)
    for mode in ("slerp", "linear"):
        path = interpolate_latents(z0, z1, 7, mode)
        assert path.shape == (7, 5)
        torch.testing.assert_close(path[0], z0)
        torch.testing.assert_close(path[-1], z1)
    slerp = interpolate_latents(z0, z1, 7)
    norms = slerp.norm(dim=1)  # slerp keeps Gaussian-typical norms in between (no shrinking)
    assert float(norms.min()) > 0.9 * min(float(z0.norm()), float(z1.norm()))
    base, source = -torch.ones(2, 1, 8, 8), torch.ones(2, 1, 8, 8)
    pasted = paste(base, source, 2, 3, 4, 2)
    assert int((pasted == 1).sum()) == 2 * 8  # a 4 x 2 box per image
    assert bool((pasted[:, :, 2:6, 3:5] == 1).all()) and float(pasted[:, :, :2].max()) == -1
    torch.testing.assert_close(mask_edit(base, source, box_mask((1, 8, 8), 2, 3, 4, 2)), pasted)
    with pytest.raises(UserError, match="box.top"):
        box_mask((1, 8, 8), 8, 0, 1, 1)


def test_edited_start_equals_the_pure_function(digits_gmm) -> None:
    """sample(x0=edited) diffuses the given images: the same as sample_es_ddpm on them."""
    sampler = es("ddpm", 10, 200, MixtureGenerator(digits_gmm))
    seeds = [0, 1, 2]
    x0 = paste(*digits_gmm.sample(6, torch.Generator().manual_seed(0))[0].split(3), 0, 0, 4, 8)
    noise, generator = noise_for(seeds, (1, 8, 8))
    edited = sampler.sample(digits_gmm, noise, generator=generator, x0=x0)
    noise, generator = noise_for(seeds, (1, 8, 8))
    pure = sample_es_ddpm(
        digits_gmm, x0, noise, sampler.sigmas(digits_gmm), solver="ddpm", generator=generator
    )
    assert torch.equal(edited, pure)
    torch.testing.assert_close(diffuse(x0, noise, 0.5), x0 + 0.5 * noise)


# --- configs and the sample.py job -----------------------------------------------------------------


def compose_sample(overrides: list[str], output_dir: Path):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(
            "sample",
            overrides=[
                f"paths.output_dir={output_dir}",
                f"paths.cache_dir={output_dir / 'cache'}",
                *overrides,
            ],
        )


def test_sampler_configs_build_without_touching_the_prior(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FASTSAMPLE_ASSETS", str(tmp_path / "no-assets"))
    for name, solver in (("es_ddpm", "ddpm"), ("es_ddpm_ddim", "ddim")):
        sampler = instantiate(compose_sample([f"sampler={name}"], tmp_path).sampler)
        assert isinstance(sampler, ESDDPMSampler) and sampler.solver == solver
        assert sampler.nfe == 25 and sampler.knobs["t_prime"] == 100
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("evaluate", overrides=["experiment=es_ddpm_fmnist", f"paths.output_dir={tmp_path}"])
    assert cfg.model.name == "fmnist_diffusion.pt" and cfg.sampler.prior._target_.endswith("vae_generator")
    assert instantiate(cfg.sampler).knobs["t_prime"] == 200
    noise, generator = noise_for(range(2), (1, 28, 28), torch.float32)
    with pytest.raises(UserError, match="make pretrain"):  # the default prior: the shipped VAE
        sampler.sample(GaussianMixture.toy("ring"), noise, generator=generator)


def test_prior_options_compose(tmp_path: Path) -> None:
    options = sorted(path.stem for path in (ROOT / "conf" / "prior").glob("*.yaml"))
    assert options == ["callable", "gaussian", "gmm", "npz", "vae"]
    np.savez(tmp_path / "s.npz", images=np.zeros((4, 8, 8, 1), np.uint8))
    extra = {
        "npz": [f"sampler.prior.path={tmp_path / 's.npz'}"],
        "callable": ["+sampler.prior.fn._target_=torch.nn.Identity", "sampler.prior.latent_shape=[1,8,8]"],
    }
    for name in options:
        cfg = compose_sample(
            ["sampler=es_ddpm", f"prior@sampler.prior={name}", *extra.get(name, [])], tmp_path
        )
        assert cfg.sampler.prior._target_.startswith("fastsample.")
        if name in extra or name == "gaussian":  # gmm needs Fashion-MNIST, vae the shipped asset
            prior = as_generator(cfg.sampler.prior).bind((1, 8, 8))
            assert prior.kind == name and prior.sample(2, SeedNoise([0, 1])).shape == (2, 1, 8, 8)


def test_sample_job_with_es_ddpm(tmp_path: Path) -> None:
    """sample.py's job end to end; run.json names the sampler, NFE and T'; batches do not matter."""
    from fastsample.jobs.sampling import generate

    base = [
        "model=gmm_toy",
        "sampler=es_ddpm",
        "prior@sampler.prior=gaussian",
        "sampler.steps=10",
        "sampler.t_prime=200",
        "seeds=0-5",
    ]
    outputs = []
    for batch in (6, 4):
        out = tmp_path / f"batch{batch}"
        generate(compose_sample([*base, f"batch_size={batch}"], out))
        run = json.loads((out / "run.json").read_text())
        assert run["sampler"] == "es_ddpm" and run["nfe"] == 10 and run["knobs"]["t_prime"] == 200
        assert run["knobs"]["solver"] == "ddpm" and run["knobs"]["prior"]["kind"] == "gaussian"
        with np.load(out / "samples.npz") as data:
            outputs.append(data["images"])
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=0, atol=1e-5)
