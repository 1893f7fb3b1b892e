"""Parity with diffusers' few-step handling: every knob equals diffusers' scheduler with the same settings.

The knobs (docs/samplers.md, "Few-step knobs"): the multistep schedulers' time-uniform timesteps
(``schedule.convention=multistep`` with 'linspace' / 'leading' / 'trailing' spacing and
``steps_offset``), the final level (``schedule.final_sigmas_type``), ``lower_order_final``,
``euler_at_final`` and ``solver_type`` of ``dpmpp_2m`` / ``dpmpp_3m``, UniPC's ``lower_order_final``,
and DEIS (``sampler=deis``, orders 1-3).

Reference: diffusers' own pipeline loop (``scale_model_input`` is the identity for these schedulers)
on the same eps network, from the same noise. The scheduler gets our float64 noise table and float64
sigmas at its own timesteps, so the comparison sees the solvers' arithmetic rather than diffusers'
float32 table (compared separately in tests/test_anchors.py); DPMSolverMultistepScheduler still rounds
its state to float32 at every step ("upcast"), hence its looser (still <= 1e-5 relative) tolerance.
Measured maxima (relative to the largest entry): DPM-Solver++ 3.9e-7, UniPC 4.5e-15, DEIS 4.4e-15 on the
2-D eps network; 8.1e-8, 7.7e-16, 6.6e-16 on the tiny UNet2DModel.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from fastsample.diffusion import (
    CountingDenoiser,
    DiscreteSchedule,
    DiscreteVPDenoiser,
    ScheduleSpec,
    make_sigmas,
)
from fastsample.models.gmm import GaussianMixture
from fastsample.samplers import Sampler

diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.usefixtures("single_thread")

DPM = diffusers.DPMSolverMultistepScheduler
UNIPC = diffusers.UniPCMultistepScheduler
DEIS = diffusers.DEISMultistepScheduler
#: relative tolerance per scheduler (DPM rounds its state to float32 each step)
RTOL = {DPM: 1e-5, UNIPC: 1e-10, DEIS: 1e-10}


class TinyEpsNet(torch.nn.Module):
    """A fixed random eps-prediction network on 2-D VP states: ``net(x_vp, t)`` (float64)."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.w1 = torch.nn.Parameter(torch.randn(2, 16, generator=generator, dtype=torch.float64))
        self.w2 = torch.nn.Parameter(0.3 * torch.randn(16, 2, generator=generator, dtype=torch.float64))
        self.freq = torch.nn.Parameter(torch.randn(16, generator=generator, dtype=torch.float64))

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels=None) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1).expand(x.shape[0], 1)
        return torch.tanh(x @ self.w1 + torch.sin(t / 300.0 * self.freq)) @ self.w2


@pytest.fixture(scope="module")
def discrete(single_thread: None) -> tuple[TinyEpsNet, DiscreteVPDenoiser]:
    """A fixed eps network on a linear-beta T = 1000 table, and our denoiser for it."""
    net = TinyEpsNet()
    return net, DiscreteVPDenoiser(net, DiscreteSchedule("linear"), prediction="eps")


def float64_scheduler(cls: type, abar: torch.Tensor, steps: int, **config: object):
    """``cls`` with ``config`` on the table ``abar``, ``steps`` set, computing its sigmas in float64."""
    scheduler = cls(**config)
    scheduler.alphas_cumprod = abar.clone()
    scheduler.set_timesteps(steps)
    table = ((1 - abar) / abar).sqrt()
    last = 0.0 if float(scheduler.sigmas[-1]) == 0 else float(table[0])
    scheduler.sigmas = torch.cat([table[scheduler.timesteps], table.new_tensor([last])])
    return scheduler


def diffusers_run(eps_net, scheduler, noise: torch.Tensor) -> torch.Tensor:
    """diffusers' loop from ``sigma_0 * noise`` (sigma space); the result in sigma space at the last level."""
    first, last = float(scheduler.sigmas[0]), float(scheduler.sigmas[-1])
    latents = noise * first / math.sqrt(1 + first**2)  # the sigma-space state sigma_0 * noise, as VP
    with torch.no_grad():
        for t in scheduler.timesteps:
            latents = scheduler.step(eps_net(latents, t), t, latents).prev_sample
    return latents * math.sqrt(1 + last**2)


def relative(mine: torch.Tensor, reference: torch.Tensor) -> float:
    return float((mine - reference).abs().max() / reference.abs().max())


def case(name: str, knobs: dict, cls: type, config: dict, steps: int, spacing: str, final: str):
    """One parity case: our sampler + knobs and the diffusers scheduler + config on the same grid."""
    label = "-".join(f"{k}={v}" for k, v in knobs.items())
    return pytest.param(
        name, knobs, cls, config, steps, spacing, final, id=f"{name}-{label}-{steps}-{spacing}-{final}"
    )


def dpm(name: str, order: int, steps: int, spacing: str, final: str, **knobs) -> object:
    extra = {"anchor_compatible": True} if name == "dpmpp_3m" else {}  # diffusers' 3M coefficient
    config = {"solver_order": order, "timestep_spacing": spacing, "final_sigmas_type": final, **knobs}
    return case(name, {**knobs, **extra}, DPM, config, steps, spacing, final)


DEFAULT_DPM = {"lower_order_final": True, "euler_at_final": False, "solver_type": "midpoint"}  # diffusers'
CASES = [
    # diffusers' default DPM-Solver++(2M) / (3M): linspace, final zero, lower_order_final
    dpm("dpmpp_2m", 2, 5, "linspace", "zero", **DEFAULT_DPM),
    dpm("dpmpp_3m", 3, 8, "linspace", "zero", **DEFAULT_DPM),
    dpm("dpmpp_3m", 3, 20, "linspace", "zero", **DEFAULT_DPM),
    # final sigma_min: lower_order_final (below 15 steps only), euler_at_final, solver_type
    *(
        dpm(
            name,
            order,
            steps,
            spacing,
            "sigma_min",
            lower_order_final=lof,
            euler_at_final=eaf,
            solver_type=st,
        )
        for name, order in (("dpmpp_2m", 2), ("dpmpp_3m", 3))
        for steps, spacing in ((8, "trailing"), (15, "leading"))
        for lof, eaf, st in ((True, False, "midpoint"), (False, False, "heun"), (False, True, "midpoint"))
    ),
    dpm("dpmpp_3m", 3, 14, "linspace", "sigma_min", lower_order_final=True, solver_type="heun"),
    # UniPC: its own lower_order_final rule (order min(p, steps left)), both final levels
    *(
        case(
            "unipc",
            {"order": order, "lower_order_final": lof},
            UNIPC,
            {
                "solver_order": order,
                "lower_order_final": lof,
                "timestep_spacing": spacing,
                "final_sigmas_type": final,
            },
            steps,
            spacing,
            final,
        )
        for order in (1, 2, 3)
        for steps, spacing, final, lof in (
            (6, "linspace", "zero", True),
            (16, "leading", "sigma_min", True),
            (9, "trailing", "sigma_min", False),
        )
    ),
    # DEIS: diffusers' grids always end at sigma_min
    *(
        case(
            "deis",
            {"order": order, "lower_order_final": lof},
            DEIS,
            {"solver_order": order, "lower_order_final": lof, "timestep_spacing": spacing},
            steps,
            spacing,
            "sigma_min",
        )
        for order in (1, 2, 3)
        for steps, spacing, lof in ((7, "linspace", True), (7, "trailing", False), (20, "leading", True))
    ),
]


@pytest.mark.parametrize(("name", "knobs", "cls", "config", "steps", "spacing", "final"), CASES)
def test_solver_knobs_equal_diffusers(
    discrete, name: str, knobs: dict, cls: type, config: dict, steps: int, spacing: str, final: str
) -> None:
    net, model = discrete
    noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    scheduler = float64_scheduler(cls, model.schedule.abar, steps, **config)
    schedule = {
        "kind": "time_uniform",
        "spacing": spacing,
        "convention": "multistep",
        "final_sigmas_type": final,
    }
    sampler = Sampler(name, steps, schedule=schedule, **knobs)
    torch.testing.assert_close(sampler.sigmas(model), scheduler.sigmas, rtol=0, atol=0)
    counter = CountingDenoiser(model)
    with torch.no_grad():
        mine = sampler.sample(counter, noise)
    reference = diffusers_run(lambda x, t: net(x, t.double()), scheduler, noise)
    assert relative(mine, reference) <= RTOL[cls], relative(mine, reference)
    assert counter.calls == sampler.nfe == len(scheduler.timesteps) == steps  # NFE claims, counted


@pytest.mark.parametrize(
    ("name", "knobs", "steps"),
    [
        ("dpmpp_2m", {"lower_order_final": True}, 8),
        ("dpmpp_2m", {"euler_at_final": True}, 20),
        ("dpmpp_2m", {"solver_type": "heun"}, 8),
        ("dpmpp_3m", {"lower_order_final": True}, 8),
        ("dpmpp_3m", {"euler_at_final": True}, 20),
        ("dpmpp_3m", {"solver_type": "midpoint"}, 8),
        ("unipc", {"lower_order_final": False}, 8),
        ("deis", {"lower_order_final": False}, 8),
        ("deis", {"euler_at_final": True}, 20),
    ],
)
def test_each_knob_changes_the_result_where_diffusers_applies_it(
    discrete, name: str, knobs: dict, steps: int
) -> None:
    """The parity cases above are not vacuous: each knob (set away from its default) moves the sample on
    a grid ending at sigma_min, and ``lower_order_final`` leaves 15 or more steps alone, as diffusers does
    (UniPC's rule applies at any step count)."""
    _, model = discrete
    noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    tail = {
        "kind": "time_uniform",
        "convention": "multistep",
        "spacing": "trailing",
        "final_sigmas_type": "sigma_min",
    }
    with torch.no_grad():
        changed = Sampler(name, steps, schedule=tail, **knobs).sample(model, noise)
        default = Sampler(name, steps, schedule=tail).sample(model, noise)
        assert relative(changed, default) > 1e-6
        if "lower_order_final" in knobs and name != "unipc":
            long = Sampler(name, 15, schedule=tail, **knobs).sample(model, noise)
            assert torch.equal(long, Sampler(name, 15, schedule=tail).sample(model, noise))


# -- the multistep schedulers' timesteps ---------------------------------------------------------


@pytest.mark.parametrize("cls", [DPM, UNIPC, DEIS], ids=["dpm", "unipc", "deis"])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("offset", [0, 1])
def test_multistep_convention_is_diffusers_timesteps(cls: type, spacing: str, offset: int) -> None:
    """``convention=multistep``: the levels at DPMSolver / UniPC / DEIS timesteps, then 0 or sigma_min."""
    table = DiscreteSchedule("linear")
    model = DiscreteVPDenoiser(torch.nn.Identity(), table)
    finals = ("sigma_min",) if cls is DEIS else ("zero", "sigma_min")
    for steps in (1, 2, 3, 5, 10, 14, 15, 20, 50, 250):
        for final in finals:
            config = {"timestep_spacing": spacing, "steps_offset": offset}
            scheduler = cls(**config, **({} if cls is DEIS else {"final_sigmas_type": final}))
            scheduler.set_timesteps(steps)
            spec = ScheduleSpec(
                kind="time_uniform",
                spacing=spacing,
                convention="multistep",
                steps_offset=offset,
                final_sigmas_type=final,
            )
            ours = make_sigmas(spec, steps, model)
            assert torch.equal(ours[:-1], table.sigmas[scheduler.timesteps]), (steps, final)
            assert float(ours[-1]) == (0.0 if final == "zero" else float(table.sigmas[0]))
            # diffusers' float32 table: its sigma_min (1 - abar_0 = 1e-4) carries ~1e-4 relative rounding
            torch.testing.assert_close(ours, scheduler.sigmas.double(), rtol=2e-4, atol=0)


# -- a diffusers UNet2DModel -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "knobs", "cls", "config", "final"),
    [
        ("deis", {"order": 3}, DEIS, {"solver_order": 3}, "sigma_min"),
        ("unipc", {"order": 3}, UNIPC, {"solver_order": 3, "final_sigmas_type": "sigma_min"}, "sigma_min"),
        (
            "dpmpp_3m",
            {"lower_order_final": True, "solver_type": "midpoint", "anchor_compatible": True},
            DPM,
            {"solver_order": 3, "final_sigmas_type": "sigma_min"},
            "sigma_min",
        ),
        ("dpmpp_2m", {"lower_order_final": True}, DPM, {}, "zero"),
    ],
)
def test_knobs_equal_diffusers_on_a_unet(
    tmp_path, name: str, knobs: dict, cls: type, config: dict, final: str
) -> None:
    """The same on a tiny diffusers UNet2DModel loaded with ``model=diffusers`` (float64): the user's path."""
    pytest.importorskip("transformers")
    from diffusers_tiny import SHAPE, save_unet_pipeline

    from fastsample.models.diffusers_adapter import load_unet

    model = load_unet(str(save_unet_pipeline(tmp_path))).double()
    unet = model.net.unet
    steps = 6
    noise = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    scheduler = float64_scheduler(cls, model.schedule.abar, steps, timestep_spacing="linspace", **config)
    schedule = {
        "kind": "time_uniform",
        "spacing": "linspace",
        "convention": "multistep",
        "final_sigmas_type": final,
    }
    sampler = Sampler(name, steps, schedule=schedule, **knobs)
    counter = CountingDenoiser(model)
    with torch.no_grad():
        mine = sampler.sample(counter, noise)
        reference = diffusers_run(lambda x, t: unet(x, t).sample, scheduler, noise)
    assert relative(mine, reference) <= RTOL[cls], relative(mine, reference)
    assert counter.calls == sampler.nfe == steps


# -- accuracy at NFE 20-50 (bench/diffusers_accuracy.py prints the full table) ---------------------


def exact_solution(
    model: GaussianMixture, x: torch.Tensor, sigma_from: float, sigma_to: float
) -> torch.Tensor:
    """The probability-flow ODE from ``x`` at ``sigma_from`` to ``sigma_to`` (0: ``D(x(1e-8), 1e-8)``)."""
    end = max(sigma_to, 1e-8)

    def field(log_sigma: float, flat: np.ndarray) -> np.ndarray:
        state = torch.from_numpy(flat).reshape(x.shape)
        return (state - model(state, math.exp(log_sigma))).reshape(-1).numpy()

    span = (math.log(sigma_from), math.log(end))
    solution = solve_ivp(field, span, x.reshape(-1).numpy(), method="DOP853", rtol=1e-12, atol=1e-12)
    state = torch.from_numpy(solution.y[:, -1].copy()).reshape(x.shape)
    return model(state, end) if sigma_to == 0 else state


@pytest.mark.parametrize("steps", [20, 50])
def test_best_solver_reaches_the_accuracy_of_diffusers_best(steps: int) -> None:
    """On the two-blob mixture over diffusers' range (157.4 -> 0.01), UniPC-3 on a log-linear grid reaches
    the accuracy of diffusers' best: it beats DEIS-3 and UniPC-3 on their time-uniform and Karras grids
    (32 samples; measured 8.2e-3 vs 4.7e-2 at NFE 20, 5.3e-4 vs 1.1e-3 at NFE 50) and equals UniPC-3 on
    diffusers' exponential sigmas, the same solver on the same grid (evaluated here at diffusers' own
    levels, the best case for diffusers: on a discrete network it truncates those timesteps)."""
    table = DiscreteSchedule("linear")
    sigma_min, sigma_max = float(table.sigmas[0]), float(table.sigmas[-1])
    model = GaussianMixture.toy("two_blobs", sigma_min=sigma_min, sigma_max=sigma_max)
    x = sigma_max * torch.randn(32, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    targets = {level: exact_solution(model, x, sigma_max, level) for level in (0.0, sigma_min)}

    def eps_net(scheduler) -> Callable:
        """The mixture as an eps network, evaluated at the level each step of ``scheduler`` uses."""
        levels = iter(scheduler.sigmas.tolist())

        def eps(x_vp: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            sigma = next(levels)
            state = x_vp * math.sqrt(1 + sigma**2)
            return (state - model(state, sigma)) / sigma

        return eps

    theirs = {}
    for label, cls, config in (
        ("DEIS-3", DEIS, {}),
        ("UniPC-3", UNIPC, {}),
        ("UniPC-3 Karras", UNIPC, {"use_karras_sigmas": True}),
        ("UniPC-3 exponential", UNIPC, {"use_exponential_sigmas": True}),
    ):
        scheduler = cls(solver_order=3, **config)
        scheduler.alphas_cumprod = table.abar.clone()
        scheduler.set_timesteps(steps)
        scheduler.sigmas = scheduler.sigmas.double()
        out = diffusers_run(eps_net(scheduler), scheduler, x / sigma_max)
        target = targets[0.0 if float(scheduler.sigmas[-1]) == 0 else sigma_min]  # DEIS ends at sigma_min
        theirs[label] = float((out - target).pow(2).mean().sqrt())
    sampler = Sampler("unipc", steps, schedule={"kind": "loglinear", "sigma_max": sigma_max}, order=3)
    with torch.no_grad():
        mine = float((sampler.sample(model, x / sigma_max) - targets[0.0]).pow(2).mean().sqrt())
    # diffusers' UniPC-3 on its exponential sigmas is the same solver on the same grid (float32 levels)
    assert mine <= 1.01 * theirs["UniPC-3 exponential"], (mine, theirs)
    assert mine <= min(theirs.values()) * 1.01, (mine, theirs)
    assert mine < min(value for label, value in theirs.items() if "exponential" not in label), (mine, theirs)
