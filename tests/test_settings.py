"""Typed settings (fastsample/jobs/schema.py): wrong types are refused by name before anything runs, and
no shipped config, option or experiment is refused (group nodes stay open for new keys).

Every bad input of the issue also has a row in the error catalog (tests/error_catalog.py, run by
tests/test_errors.py); these tests check what a row cannot: conversions, and the absence of false alarms.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from fastsample.jobs.schema import validate
from fastsample.utils.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def composed(config: str, *overrides: str):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose(config, overrides=["paths.output_dir=/tmp/fastsample-settings", *overrides])


def options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize(
    ("config", "override", "message"),
    [
        ("sample", "sampler.steps=ten", r"sampler\.steps='ten' is not an integer"),
        ("sample", "sampler.steps=2.5", r"sampler\.steps=2\.5 is not an integer"),
        ("sample", "batch_size=abc", r"batch_size='abc' is not an integer"),
        ("sample", "batch_size=2.5", r"batch_size=2\.5 is not an integer"),
        ("sample", "sampler.schedule.rho=abc", r"sampler\.schedule\.rho='abc' is not a number"),
        ("sample", "seeds=abc", r"seeds='abc' is not a seed list"),
        ("sample", "seeds=-5", r"seeds=-5 is not allowed"),
        ("sample", "seeds=5-3", r"descending range 5-3; write it as 3-5"),
        ("sample", "device=tpu", r"device='tpu' is not allowed"),
        ("sample", "shape=[1,a]", r"shape=\[1, 'a'\] is not a list of integers"),
        ("sample", "dataset.download=maybe", r"dataset\.download='maybe' is not true or false"),
        ("sample", "schedule_search.ays.lr=fast", r"schedule_search\.ays\.lr='fast' is not a number"),
        ("evaluate", "evaluator.is_splits=x", r"evaluator\.is_splits='x' is not an integer"),
        ("train", "dataset.batch_size=abc", r"dataset\.batch_size='abc' is not an integer"),
        ("train", "task.lr=abc", r"task\.lr='abc' is not a number"),
        ("train", "seed=x", r"seed='x' is not an integer"),
    ],
)
def test_wrong_types_are_refused_by_name(config: str, override: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        validate(composed(config, override), config)


def test_quoted_and_integral_numbers_are_converted() -> None:
    cfg = validate(composed("sample", "batch_size='12'", "sampler.steps=8.0"), "sample")
    assert cfg.batch_size == 12 and isinstance(cfg.batch_size, int)
    assert cfg.sampler.steps == 8 and isinstance(cfg.sampler.steps, int)
    cfg = validate(composed("train", "trainer.max_steps=1e3"), "train")
    assert cfg.trainer.max_steps == 1000 and isinstance(cfg.trainer.max_steps, int)
    cfg = validate(composed("sample", "sampler.schedule.rho=7"), "sample")
    assert cfg.sampler.schedule.rho == 7 and isinstance(cfg.sampler.schedule.rho, int)  # as written


def test_unknown_keys_of_a_target_are_refused_with_its_settings() -> None:
    cfg = composed("sample", "model=callable", "model.fn=my.model", "+model.model_channels=32")
    with pytest.raises(
        UserError, match=r"model\.model_channels is not a setting of model .*its settings: fn, kwargs"
    ):
        validate(cfg, "sample")


def test_group_nodes_stay_open() -> None:
    cfg = composed("sample", "+sampler.future_knob=1", "+tune.new_setting=2", "+schedule_search.extra=3")
    validate(cfg, "sample")  # unknown knobs are the sampler's own business (it lists its allowed ones)


@pytest.mark.parametrize("config", ["sample", "evaluate"])
@pytest.mark.parametrize("group", ["sampler", "model", "guidance"])
def test_every_option_passes(config: str, group: str) -> None:
    for option in options(group):
        validate(composed(config, f"{group}={option}"), config)


def test_every_experiment_passes() -> None:
    for name in options("experiment"):
        for config in ("sample", "evaluate", "train"):
            try:
                cfg = composed(config, f"experiment={name}")
            except Exception:  # an experiment of another entry point (Hydra refuses its overrides)
                continue
            validate(cfg, config)


@pytest.mark.parametrize("group", ["dataset", "trainer", "task", "callbacks", "logger"])
def test_every_training_option_passes(group: str) -> None:
    for option in options(group):
        validate(composed("train", f"{group}={option}"), "train")


def test_every_sampler_with_a_schedule_takes_a_schedule_file() -> None:
    """``sampler.schedule.path=FILE`` (docs/schedules.md) needs the key in every schedule node."""
    for option in options("sampler"):
        node = OmegaConf.load(CONF / "sampler" / f"{option}.yaml")
        if "schedule" in node:
            assert "path" in node.schedule, f"conf/sampler/{option}.yaml: schedule has no path"


def test_documented_ays_defaults_are_the_configured_ones() -> None:
    settings = yaml.safe_load((CONF / "schedule_search" / "default.yaml").read_text())["ays"]
    text = (ROOT / "docs" / "schedules.md").read_text()
    assert f"(`ays.lr` {settings['lr']}, `ays.iterations` {settings['iterations']})" in text
