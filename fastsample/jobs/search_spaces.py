"""Optuna search-space extenders for ``conf/hparams_search`` (hydra-optuna-sweeper's
``custom_search_space``): parameters whose range depends on another one.

The sweeper calls ``extender(cfg, trial)`` after suggesting the plain ``params`` of the config; what
the extender suggests becomes one more ``key=value`` override of the trial.
"""

from __future__ import annotations

from typing import Any

#: how Restart's t_max is searched relative to t_min (ratio range) and its absolute cap
RESTART_T_MAX_DEFAULTS = {"ratio_low": 1.5, "ratio_high": 20.0, "high": 20.0}


def restart_search_space(cfg: Any, trial: Any) -> None:
    """Suggest ``t_max`` of the first restart interval above the already suggested ``t_min``.

    Independent ranges for the two would give invalid intervals (t_min >= t_max, a clean error that
    would end the whole sweep); here ``t_max = t_min * ratio`` with ``ratio`` log-uniform in
    ``[ratio_low, ratio_high]`` and ``t_max <= high``, read from ``restart_search.t_max`` in the
    config when present.
    """
    settings = dict(RESTART_T_MAX_DEFAULTS)
    section = cfg.get("restart_search") if hasattr(cfg, "get") else None
    if section is not None and section.get("t_max") is not None:
        settings.update(dict(section.t_max))
    key = "sampler.restart_list.0"
    t_min = float(trial.params[f"{key}.t_min"])
    low = t_min * float(settings["ratio_low"])
    high = max(min(t_min * float(settings["ratio_high"]), float(settings["high"])), low)
    trial.suggest_float(f"{key}.t_max", low, high, log=True)
