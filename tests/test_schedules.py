"""Noise schedules: shape and range contracts of every kind, their formulas, and input validation."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fastsample.diffusion import DiscreteSchedule, ScheduleSpec, make_sigmas
from fastsample.diffusion.schedules import SCHEDULES, validate_sigmas
from fastsample.utils.errors import UserError

TABLE = DiscreteSchedule("linear").sigmas  # ascending, 0.0100 .. 157.4
# a model whose trained range lies inside its discrete table, so every kind can honour the range
MODEL = SimpleNamespace(sigma_min=0.1, sigma_max=50.0, discrete_sigmas=TABLE)
RANGE_KINDS = ("karras", "vp", "loglinear", "quadratic")
STEP_COUNTS = (1, 2, 3, 10, 50)


def test_every_kind_is_covered() -> None:
    assert set(SCHEDULES) == {*RANGE_KINDS, "time_uniform", "explicit", "file"}


@pytest.mark.parametrize("kind", [*RANGE_KINDS, "time_uniform"])
@pytest.mark.parametrize("steps", STEP_COUNTS)
def test_grid_contract(kind: str, steps: int) -> None:
    sigmas = make_sigmas(ScheduleSpec(kind=kind), steps, MODEL)
    assert sigmas.dtype == torch.float64
    assert sigmas.shape == (steps + 1,)
    assert float(sigmas[-1]) == 0.0
    assert bool((sigmas[:-1] > 0).all())
    assert bool((sigmas[:-1] > sigmas[1:]).all()), sigmas


@pytest.mark.parametrize("kind", RANGE_KINDS)
@pytest.mark.parametrize("steps", STEP_COUNTS)
def test_range_kinds_span_the_trained_range(kind: str, steps: int) -> None:
    sigmas = make_sigmas(ScheduleSpec(kind=kind), steps, MODEL)
    assert math.isclose(float(sigmas[0]), MODEL.sigma_max, rel_tol=1e-12)
    if steps > 1:
        assert math.isclose(float(sigmas[-2]), MODEL.sigma_min, rel_tol=1e-12)


@pytest.mark.parametrize("kind", RANGE_KINDS)
@pytest.mark.parametrize("steps", [1, 4, 20])
def test_explicit_range_overrides_the_model(kind: str, steps: int) -> None:
    spec = ScheduleSpec(kind=kind, sigma_min=0.5, sigma_max=20.0)
    sigmas = make_sigmas(spec, steps, MODEL, append_zero=False)
    assert sigmas.shape == (steps + 1,)
    assert bool((sigmas > 0).all()) and bool((sigmas[:-1] > sigmas[1:]).all())
    assert math.isclose(float(sigmas[0]), 20.0, rel_tol=1e-12)
    assert math.isclose(float(sigmas[-1]), 0.5, rel_tol=1e-12)


@pytest.mark.parametrize("kind", [*RANGE_KINDS, "time_uniform"])
@pytest.mark.parametrize("steps", [1, 5, 30])
def test_append_zero_false_gives_positive_grid_with_one_more_level(kind: str, steps: int) -> None:
    with_zero = make_sigmas(ScheduleSpec(kind=kind), steps, MODEL)
    without = make_sigmas(ScheduleSpec(kind=kind), steps, MODEL, append_zero=False)
    assert without.shape == (steps + 1,)
    assert bool((without > 0).all()) and bool((without[:-1] > without[1:]).all())
    if kind in RANGE_KINDS:
        assert math.isclose(float(without[0]), MODEL.sigma_max, rel_tol=1e-12)
        assert math.isclose(float(without[-1]), MODEL.sigma_min, rel_tol=1e-12)
        # the positive grid is the same family with steps + 1 points: steps + 1 -> zero-appended grid
        again = make_sigmas(ScheduleSpec(kind=kind), steps + 1, MODEL)
        torch.testing.assert_close(without, again[:-1], rtol=1e-13, atol=0)
    else:
        assert set(without.tolist()) <= set(TABLE.double().tolist())
    assert with_zero.shape == (steps + 1,)


def test_model_range_defaults() -> None:
    """No model: EDM's range [0.002, 80]; a model: its sigma_min / sigma_max."""
    sigmas = make_sigmas(ScheduleSpec(kind="karras"), 8, None)
    assert math.isclose(float(sigmas[0]), 80.0) and math.isclose(float(sigmas[-2]), 0.002)
    model = SimpleNamespace(sigma_min=0.03, sigma_max=7.0)
    sigmas = make_sigmas(ScheduleSpec(kind="loglinear"), 8, model)
    assert math.isclose(float(sigmas[0]), 7.0) and math.isclose(float(sigmas[-2]), 0.03)


# --- formulas, written out independently -------------------------------------------------------


@pytest.mark.parametrize("rho", [1.0, 3.0, 7.0])
def test_karras_formula(rho: float) -> None:
    n, lo, hi = 12, 0.002, 80.0
    expected = [
        (hi ** (1 / rho) + i / (n - 1) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho for i in range(n)
    ]
    sigmas = make_sigmas(ScheduleSpec(kind="karras", rho=rho, sigma_min=lo, sigma_max=hi), n, None)
    expected_grid = torch.tensor([*expected, 0.0], dtype=torch.float64)
    torch.testing.assert_close(sigmas, expected_grid, rtol=1e-12, atol=0)


def test_karras_rho_one_is_uniform_in_sigma() -> None:
    sigmas = make_sigmas(ScheduleSpec(kind="karras", rho=1.0, sigma_min=1.0, sigma_max=11.0), 11, None)
    torch.testing.assert_close(sigmas[:-1], torch.arange(11.0, 0.0, -1.0, dtype=torch.float64))


def test_loglinear_has_constant_ratio() -> None:
    sigmas = make_sigmas(ScheduleSpec(kind="loglinear", sigma_min=0.01, sigma_max=100.0), 5, None)
    torch.testing.assert_close(sigmas[:-1], torch.tensor([100.0, 10.0, 1.0, 0.1, 0.01], dtype=torch.float64))


def test_vp_is_uniform_in_continuous_vp_time() -> None:
    beta_d, beta_min = 19.9, 0.1
    sigmas = make_sigmas(ScheduleSpec(kind="vp", sigma_min=0.002, sigma_max=80.0), 9, None)[:-1]
    # invert sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) (Song et al.'s VP SDE)
    t = ((beta_min**2 + 2 * beta_d * torch.log1p(sigmas**2)).sqrt() - beta_min) / beta_d
    steps = t[:-1] - t[1:]
    torch.testing.assert_close(steps, steps.mean().expand_as(steps), rtol=1e-10, atol=0)


def test_vp_extra_settings_are_used() -> None:
    spec = ScheduleSpec(kind="vp", sigma_min=0.002, sigma_max=80.0, extra={"beta_d": 10.0, "beta_min": 0.5})
    sigmas = make_sigmas(spec, 9, None)[:-1]
    t = ((0.5**2 + 2 * 10.0 * torch.log1p(sigmas**2)).sqrt() - 0.5) / 10.0
    steps = t[:-1] - t[1:]
    torch.testing.assert_close(steps, steps.mean().expand_as(steps), rtol=1e-10, atol=0)


def test_quadratic_is_uniform_in_sqrt_timestep() -> None:
    sigmas = make_sigmas(ScheduleSpec(kind="quadratic"), 10, MODEL)[:-1]
    # fractional timesteps by log-sigma interpolation of the table (numpy, independently)
    t = torch.from_numpy(np.interp(sigmas.log().numpy(), TABLE.double().log().numpy(), np.arange(len(TABLE))))
    offsets = (t - t[-1]).clamp(min=0).sqrt()
    gaps = offsets[:-1] - offsets[1:]
    torch.testing.assert_close(gaps, gaps.mean().expand_as(gaps), rtol=1e-8, atol=0)


@pytest.mark.parametrize(
    ("spacing", "steps", "expected_t"),
    [
        ("leading", 4, [750, 500, 250, 0]),
        ("trailing", 4, [999, 749, 499, 249]),
        ("linspace", 4, [999, 666, 333, 0]),
        ("leading", 3, [666, 333, 0]),
        ("trailing", 3, [999, 666, 332]),
    ],
)
def test_time_uniform_timesteps(spacing: str, steps: int, expected_t: list[int]) -> None:
    sigmas = make_sigmas(ScheduleSpec(kind="time_uniform", spacing=spacing), steps, MODEL)
    torch.testing.assert_close(sigmas[:-1], TABLE.double()[expected_t], rtol=0, atol=0)


def test_time_uniform_uses_the_models_own_table() -> None:
    cosine = DiscreteSchedule("cosine", steps=100)
    model = SimpleNamespace(
        sigma_min=float(cosine.sigmas[0]), sigma_max=float(cosine.sigmas[-1]), discrete_sigmas=cosine.sigmas
    )
    sigmas = make_sigmas(ScheduleSpec(kind="time_uniform", spacing="leading"), 10, model)
    torch.testing.assert_close(sigmas[:-1], cosine.sigmas.double()[list(range(90, -1, -10))], rtol=0, atol=0)


def test_time_uniform_steps_limited_by_table_length() -> None:
    table_length = len(TABLE)
    full = make_sigmas(ScheduleSpec(kind="time_uniform"), table_length, MODEL)
    torch.testing.assert_close(full[:-1], TABLE.double().flip(0), rtol=0, atol=0)
    with pytest.raises(UserError, match="sampler.steps"):
        make_sigmas(ScheduleSpec(kind="time_uniform"), table_length + 1, MODEL)
    with pytest.raises(UserError, match="sampler.steps"):  # steps + 1 levels without the zero
        make_sigmas(ScheduleSpec(kind="time_uniform"), table_length, MODEL, append_zero=False)


# --- diffusers' multistep timesteps and the final level (tests/test_diffusers_parity.py: vs diffusers)


@pytest.mark.parametrize(
    ("spacing", "steps", "offset", "expected_t"),
    [
        ("linspace", 4, 0, [999, 749, 500, 250]),  # linspace(0, 999, 5).round() without t = 0
        ("leading", 4, 0, [800, 600, 400, 200]),  # 1000 // 5 = 200
        ("leading", 4, 1, [801, 601, 401, 201]),
        ("trailing", 4, 0, [999, 749, 499, 249]),  # as DDIM's trailing
        ("linspace", 1, 0, [999]),
    ],
)
def test_multistep_convention_timesteps(spacing: str, steps: int, offset: int, expected_t: list[int]) -> None:
    spec = ScheduleSpec(kind="time_uniform", spacing=spacing, convention="multistep", steps_offset=offset)
    sigmas = make_sigmas(spec, steps, MODEL)
    torch.testing.assert_close(sigmas[:-1], TABLE.double()[expected_t], rtol=0, atol=0)
    assert float(sigmas[-1]) == 0.0


def test_steps_offset_shifts_ddim_leading_only() -> None:
    plain = make_sigmas(ScheduleSpec(kind="time_uniform", spacing="leading"), 4, MODEL)
    shifted = make_sigmas(ScheduleSpec(kind="time_uniform", spacing="leading", steps_offset=1), 4, MODEL)
    torch.testing.assert_close(shifted[:-1], TABLE.double()[[751, 501, 251, 1]], rtol=0, atol=0)
    assert not torch.equal(plain, shifted)
    for spacing in ("trailing", "linspace"):
        spec = ScheduleSpec(kind="time_uniform", spacing=spacing, steps_offset=1)
        assert torch.equal(
            make_sigmas(spec, 4, MODEL),
            make_sigmas(ScheduleSpec(kind="time_uniform", spacing=spacing), 4, MODEL),
        )
    with pytest.raises(UserError, match="steps_offset"):
        make_sigmas(ScheduleSpec(kind="time_uniform", spacing="leading", steps_offset=300), 4, MODEL)


@pytest.mark.parametrize("kind", RANGE_KINDS)
@pytest.mark.parametrize("steps", [1, 4, 20])
def test_final_sigma_min_on_a_range_kind_is_one_more_level(kind: str, steps: int) -> None:
    """A range kind ends at sigma_min by itself: ending the grid there is the positive grid of
    ``append_zero=False`` (steps + 1 levels), never a zero-length last step."""
    spec = ScheduleSpec(kind=kind, final_sigmas_type="sigma_min")
    sigmas = make_sigmas(spec, steps, MODEL)
    assert sigmas.shape == (steps + 1,) and bool((sigmas[:-1] > sigmas[1:]).all())
    assert torch.equal(sigmas, make_sigmas(ScheduleSpec(kind=kind), steps, MODEL, append_zero=False))
    assert math.isclose(float(sigmas[-1]), MODEL.sigma_min, rel_tol=1e-12)


@pytest.mark.parametrize("convention", ["ddim", "multistep"])
def test_final_sigma_min_on_time_uniform_appends_the_table_minimum(convention: str) -> None:
    spec = ScheduleSpec(kind="time_uniform", spacing="trailing", convention=convention)
    zero = make_sigmas(spec, 5, MODEL)
    to_min = make_sigmas(ScheduleSpec(**{**spec.__dict__, "final_sigmas_type": "sigma_min"}), 5, MODEL)
    assert torch.equal(to_min[:-1], zero[:-1]) and float(to_min[-1]) == float(TABLE[0])
    # DDIM's 'leading' / 'linspace' end on t = 0 already: a zero-length last step is refused
    with pytest.raises(UserError, match="final_sigmas_type=sigma_min"):
        make_sigmas(
            ScheduleSpec(kind="time_uniform", spacing="leading", final_sigmas_type="sigma_min"), 5, MODEL
        )
    with_offset = ScheduleSpec(
        kind="time_uniform", spacing="leading", steps_offset=1, final_sigmas_type="sigma_min"
    )
    assert float(make_sigmas(with_offset, 5, MODEL)[-1]) == float(TABLE[0])


def test_multistep_steps_limited_by_table_length() -> None:
    spec = ScheduleSpec(kind="time_uniform", spacing="linspace", convention="multistep")
    assert len(make_sigmas(spec, len(TABLE) - 1, MODEL)) == len(TABLE)
    with pytest.raises(UserError, match="sampler.steps"):
        make_sigmas(spec, len(TABLE), MODEL)


# --- the discrete table's sigma <-> timestep maps ----------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_sigma_to_t_inverts_the_table(kind: str) -> None:
    """Table sigmas map back to their integer timesteps; in between, log-sigma interpolation."""
    schedule = DiscreteSchedule(kind)
    t = torch.tensor([0, 1, 26, 277, 500, 998, 999])
    torch.testing.assert_close(schedule.sigma_to_t(schedule.sigmas[t]), t.double(), rtol=0, atol=1e-9)
    torch.testing.assert_close(schedule.sigma_to_t(schedule.sigmas[t], "nearest"), t.double(), rtol=0, atol=0)
    fractional = torch.tensor([0.25, 10.5, 640.75, 998.9], dtype=torch.float64)
    expected = np.interp(
        schedule.t_to_sigma(fractional).log().numpy(), schedule.log_sigmas.numpy(), np.arange(schedule.steps)
    )
    roundtrip = schedule.sigma_to_t(schedule.t_to_sigma(fractional))
    torch.testing.assert_close(roundtrip, fractional, rtol=0, atol=1e-9)
    torch.testing.assert_close(torch.from_numpy(expected), fractional, rtol=0, atol=1e-9)


def test_t_to_sigma_hits_the_table() -> None:
    schedule = DiscreteSchedule("linear")
    t = torch.tensor([0.0, 26.0, 500.0, 999.0])
    torch.testing.assert_close(schedule.t_to_sigma(t), schedule.sigmas[t.long()], rtol=1e-12, atol=0)
    # abar_t from the betas, written out: sigma_t = sqrt((1 - abar) / abar)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    torch.testing.assert_close(schedule.sigmas, ((1 - abar) / abar).sqrt(), rtol=1e-12, atol=0)


# --- validation ---------------------------------------------------------------------------------


def test_explicit_grid_is_returned_in_float64() -> None:
    sigmas = make_sigmas(ScheduleSpec(kind="explicit", sigmas=[10, 2.5, 0.5, 0]), 3)
    assert sigmas.dtype == torch.float64
    assert sigmas.tolist() == [10.0, 2.5, 0.5, 0.0]


@pytest.mark.parametrize(
    ("grid", "steps", "message"),
    [
        (None, 3, "must be given"),
        ([0.0], 0, "at least two"),
        ([10, 2, 1, 0], 2, "3 steps need|2 steps need"),
        ([10, 2, 1, 0.5], 3, "must end at 0"),
        ([10, 2, 3, 0], 3, "strictly decreasing"),
        ([10, 2, 2, 0], 3, "strictly decreasing"),
        ([-1, -2, 0], 2, "strictly decreasing"),
    ],
)
def test_explicit_grid_errors(grid, steps: int, message: str) -> None:
    with pytest.raises(UserError, match="sampler.schedule.sigmas") as info:
        make_sigmas(ScheduleSpec(kind="explicit", sigmas=grid), steps)
    assert info.match(message)


def test_validate_sigmas_without_step_count() -> None:
    assert validate_sigmas([3.0, 1.0, 0.0]).tolist() == [3.0, 1.0, 0.0]


@pytest.mark.parametrize(
    ("spec", "setting"),
    [
        (ScheduleSpec(kind="cosine_magic"), "sampler.schedule.kind"),
        (ScheduleSpec(kind="karras", sigma_min=1.0, sigma_max=1.0), "sigma_min"),
        (ScheduleSpec(kind="karras", sigma_min=5.0, sigma_max=1.0), "sigma_min"),
        (ScheduleSpec(kind="loglinear", sigma_min=0.0, sigma_max=1.0), "sampler.schedule.sigma_min"),
        (ScheduleSpec(kind="karras", rho=0.0), "sampler.schedule.rho"),
        (ScheduleSpec(kind="time_uniform", spacing="sideways"), "sampler.schedule.spacing"),
        (ScheduleSpec(kind="time_uniform", convention="pndm"), "sampler.schedule.convention"),
        (ScheduleSpec(kind="karras", final_sigmas_type="one"), "sampler.schedule.final_sigmas_type"),
    ],
)
def test_bad_schedule_settings(spec: ScheduleSpec, setting: str) -> None:
    with pytest.raises(UserError, match=setting.replace(".", r"\.")):
        make_sigmas(spec, 10, MODEL)


@pytest.mark.parametrize("steps", [0, -3])
def test_steps_must_be_positive(steps: int) -> None:
    with pytest.raises(UserError, match="sampler.steps"):
        make_sigmas(ScheduleSpec(kind="karras"), steps, MODEL)
