"""BaseSampler: every sampler class follows one protocol and runs through its guarded, no-grad loop."""

from __future__ import annotations

import pytest
import torch

from fastsample.samplers import Sampler
from fastsample.samplers.base import BaseSampler
from fastsample.samplers.diffusers_scheduler import DiffusersSampler
from fastsample.samplers.dsno import DSNOSampler
from fastsample.samplers.es_ddpm import ESDDPMSampler
from fastsample.samplers.ggdm import GGDMSampler
from fastsample.utils.errors import NumericalError
from fastsample.utils.seeding import SeedNoise

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("cls", [Sampler, ESDDPMSampler, DiffusersSampler, GGDMSampler, DSNOSampler])
def test_every_sampler_is_a_base_sampler(cls: type) -> None:
    assert issubclass(cls, BaseSampler)
    for method in ("run", "sample"):  # one implementation, in the base
        assert getattr(cls, method) is getattr(BaseSampler, method)


def test_learned_sampler_builds_no_graph_unless_asked(digits_gmm) -> None:
    """+TIME levels require grad; sampling without grad=True still keeps no graph (as the registry)."""
    sampler = GGDMSampler.from_schedule(digits_gmm, 3, "quadratic")
    assert sampler.time_logits is not None
    noise = SeedNoise(range(2)).randn((1, 8, 8), dtype=torch.float64)
    assert not sampler.sample(digits_gmm, noise, generator=SeedNoise(range(2))).requires_grad
    assert sampler.sample(digits_gmm, noise, generator=SeedNoise(range(2)), grad=True).requires_grad


def test_learned_sampler_states_are_guarded(digits_gmm) -> None:
    """A state that becomes non-finite after a step is an error naming the step (the model's outputs
    are finite here: only the sampler's own combination overflows)."""
    sampler = GGDMSampler.from_schedule(digits_gmm, 3, "quadratic")
    with torch.no_grad():
        sampler.pred_coef.fill_(1e300)  # a diverged DDSS run: inf once cast to the float32 state
    noise = SeedNoise(range(2)).randn((1, 8, 8))
    with pytest.raises(NumericalError, match=r"sampler state became non-finite at step 0 "):
        sampler.sample(digits_gmm, noise, generator=SeedNoise(range(2)))
