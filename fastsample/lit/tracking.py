"""Experiment tracking for every entry point: the ``logger`` config group (csv | tensorboard | wandb).

``train.py`` hands the loggers to the Lightning trainer; ``sample.py``, ``evaluate.py``, the FID-vs-NFE
benchmark and the sweep callback (:mod:`fastsample.jobs.sweeps`) log through :func:`log_job` /
:func:`log_summary`: the resolved config as hyperparameters, numeric results as ``<stage>/<name>``
metrics, PNG files (sample grids, plots) as images and result tables as tables.

Weights & Biases (:func:`wandb_logger`) never waits for a login: ``mode=auto`` runs online only when
credentials exist (``WANDB_API_KEY`` or a ``~/.netrc`` entry for the W&B host) or ``WANDB_MODE`` says
so, and offline otherwise; an offline run directory (``<output_dir>/wandb/offline-run-*``) is uploaded
later with ``wandb sync <dir>``. Jobs of one Hydra multirun share a W&B group named after the sweep
directory (:func:`sweep_group`), so a sweep's runs are one group in the W&B UI.
"""

from __future__ import annotations

import contextlib
import json
import netrc
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf
from PIL import Image
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger

from fastsample.utils.errors import check_choice
from fastsample.utils.instantiation import instantiate_group
from fastsample.utils.quiet import quiet_wandb

WANDB_MODES = ("auto", "online", "offline")
DEFAULT_WANDB_HOST = "https://api.wandb.ai"


# --------------------------------------------------------------------------------------------------
# W&B: offline unless credentials exist, one group per sweep


def wandb_credentials() -> bool:
    """Whether W&B credentials exist: ``WANDB_API_KEY`` or a ``.netrc`` password for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or DEFAULT_WANDB_HOST).hostname
    path = os.environ.get("NETRC") or Path.home() / ".netrc"
    try:
        entry = netrc.netrc(str(path)).authenticators(host or "")
    except (OSError, netrc.NetrcParseError):
        return False  # no file, unreadable or malformed: no usable credentials
    return bool(entry and entry[2])


def wandb_offline(mode: str = "auto") -> bool:
    """Resolve ``mode``: ``auto`` is offline unless ``WANDB_MODE`` says online or credentials exist.

    An online run without credentials would prompt for a login (and wait forever in a batch job),
    which is why ``auto`` is the default of ``conf/logger/wandb.yaml``.
    """
    check_choice("logger.wandb.mode", mode, WANDB_MODES)
    if mode != "auto":
        return mode == "offline"
    env_mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if env_mode:
        return env_mode in ("offline", "dryrun")
    return not wandb_credentials()


def group_name(sweep_dir: str | os.PathLike) -> str:
    """A sweep's W&B group: its folder's last two parts (``multirun/sample/<t>`` -> ``sample-<t>``)."""
    return "-".join(Path(sweep_dir).parts[-2:])


def _hydra_config() -> Any:
    """The running Hydra job's config (``hydra.*``), or ``None`` outside a Hydra app (compose API)."""

    return HydraConfig.get() if HydraConfig.initialized() else None


def sweep_group() -> str | None:
    """The group of the current multirun job (from the sweep directory); ``None`` for a single run."""

    hydra_cfg = _hydra_config()
    if hydra_cfg is None or hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    return group_name(hydra_cfg.sweep.dir)


def job_run_name(name: str) -> str:
    """``name``, plus the job's overrides inside a multirun (``sample[sampler=heun,sampler.steps=8]``)."""
    hydra_cfg = _hydra_config()
    overrides = hydra_cfg.job.override_dirname if hydra_cfg is not None and sweep_group() else ""
    return f"{name}[{overrides}]" if overrides else name


def wandb_logger(
    project: str = "fastsample",
    name: str | None = None,
    save_dir: str | os.PathLike = ".",
    mode: str = "auto",
    group: str | None = "auto",
    job_type: str | None = None,
    tags: Sequence[str] = (),
    log_model: bool = False,
    **kwargs: Any,
) -> Any:
    """A Lightning ``WandbLogger`` that is offline without credentials and grouped by sweep.

    ``mode``: ``auto`` | ``online`` | ``offline`` (:func:`wandb_offline`); ``group``: ``auto`` (the
    sweep's group inside a multirun, none otherwise), ``null`` or a name. Further keyword arguments go
    to ``wandb.init`` (e.g. ``entity``, ``notes``).
    """

    Path(save_dir).mkdir(parents=True, exist_ok=True)  # wandb falls back to a temp dir if it is missing
    quiet_wandb()  # Lightning passes anonymous=None, which W&B warns about on every run
    return WandbLogger(
        project=project,
        name=job_run_name(name) if name else None,
        save_dir=str(save_dir),
        offline=wandb_offline(mode),
        group=sweep_group() if group == "auto" else group,
        job_type=job_type,
        tags=list(tags),
        log_model=log_model,
        **kwargs,
    )


# --------------------------------------------------------------------------------------------------
# Building, feeding and closing the configured loggers


def resolved_config(cfg: Any) -> dict[str, Any]:
    """``cfg`` as plain containers with interpolations resolved; unresolvable ones keep their text.

    Outside a Hydra app (compose API, the benchmark) ``${hydra:...}`` cannot resolve; the config
    logged then shows the interpolation instead of failing the run.
    """

    if not isinstance(cfg, (DictConfig, ListConfig)):
        return json.loads(json.dumps(cfg, default=str))
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # an unresolvable interpolation somewhere: resolve node by node instead
        raw = OmegaConf.to_container(cfg, resolve=False)
        return _resolve_leaves(cfg, raw, "")


def _resolve_leaves(cfg: Any, raw: Any, prefix: str) -> Any:

    if isinstance(raw, dict):
        return {key: _resolve_leaves(cfg, value, f"{prefix}{key}.") for key, value in raw.items()}
    if isinstance(raw, list):
        return [_resolve_leaves(cfg, value, f"{prefix}{index}.") for index, value in enumerate(raw)]
    if isinstance(raw, str) and "${" in raw:
        value = OmegaConf.select(cfg, prefix[:-1], throw_on_resolution_failure=False, default=raw)
        return OmegaConf.to_container(value, resolve=False) if OmegaConf.is_config(value) else value
    return raw


def numeric_metrics(values: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """``<prefix>/<key>: float`` for the numeric, finite-or-NaN scalars of ``values`` (bools excluded)."""
    return {
        f"{prefix}/{key}": float(value)
        for key, value in values.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def log_images(loggers: Sequence[Any], images: Mapping[str, str | os.PathLike], step: int = 0) -> None:
    """Log PNG files: W&B media, TensorBoard images; CSV has no image channel (the files stay on disk)."""

    present = {key: Path(path) for key, path in images.items() if Path(path).is_file()}
    for logger in loggers:
        for key, path in present.items():
            if isinstance(logger, WandbLogger):
                logger.log_image(key=key, images=[str(path)], step=step)
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(key, _read_png(path), step, dataformats="HWC")


def _read_png(path: Path) -> Any:

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def log_table(loggers: Sequence[Any], key: str, rows: Sequence[Mapping[str, Any]], markdown: str) -> None:
    """A results table: a W&B table, TensorBoard text (markdown); CSV loggers get nothing (the CSV exists)."""

    if not rows:
        return
    columns = list(dict.fromkeys(column for row in rows for column in row))
    data = [[_table_cell(row.get(column)) for column in columns] for row in rows]
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.log_table(key=key, columns=columns, data=data)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text(key, markdown, 0)


def _table_cell(value: Any) -> Any:
    """W&B table cells: numbers and strings (None -> empty, NaN kept as a float, others as text)."""
    if value is None:
        return ""
    if isinstance(value, (int, float, str)):
        return value
    return json.dumps(value, default=str)


def finish_runs(loggers: Sequence[Any], status: str = "success") -> None:
    """Finish the W&B runs of ``loggers`` (Lightning finalizes loggers but leaves ``wandb.run`` open).

    Lightning's ``WandbLogger`` reuses a still-open ``wandb.run``: without ``finish`` the jobs of a
    sweep run in one process would all log into the first job's run.
    """

    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger._experiment.finish(exit_code=0 if status == "success" else 1)


def close_loggers(loggers: Sequence[Any], status: str = "success") -> None:
    """Finalize every logger and finish its W&B run, so the next job of a multirun starts a new one."""
    for logger in loggers:
        logger.finalize(status)
    finish_runs(loggers, status)


@contextlib.contextmanager
def open_loggers(node: Mapping[str, Any] | None, **overrides: Any) -> Iterator[list[Any]]:
    """The ``logger`` group's loggers for a block (``overrides`` as in
    :func:`~fastsample.utils.instantiation.instantiate_group`); closes them (status ``failed`` on an
    exception) afterwards."""

    loggers = instantiate_group(node, **overrides)
    status = "failed"
    try:
        yield loggers
        status = "success"
    finally:
        close_loggers(loggers, status)


def log_job(
    cfg: Any,
    results: Mapping[str, Any],
    stage: str,
    *,
    info: Mapping[str, Any] | None = None,
    images: Mapping[str, str | os.PathLike] | None = None,
) -> None:
    """One job's record in the configured loggers (none configured: nothing, not even an import).

    The resolved config and ``info`` (what was run) go in as hyperparameters, the numeric ``results``
    as ``<stage>/<name>`` metrics at step 0, ``images`` (key -> PNG file) as images.
    """
    node = cfg.get("logger") if hasattr(cfg, "get") else None
    if not node:
        return
    with open_loggers(node) as loggers:
        params = resolved_config(cfg)
        if info:
            params["run"] = json.loads(json.dumps(dict(info), default=str))
        metrics = numeric_metrics(results, stage)
        for logger in loggers:
            logger.log_hyperparams(params)
            logger.log_metrics(metrics, step=0)
        log_images(loggers, images or {})


def log_summary(
    node: Mapping[str, Any] | None,
    rows: Sequence[Mapping[str, Any]],
    markdown: str,
    *,
    key: str,
    plots: Mapping[str, str | os.PathLike] | None = None,
    **overrides: Any,
) -> None:
    """A results table (and plots) of a benchmark or sweep, as its own run of the configured loggers.

    CSV loggers are skipped: the table is already written as a CSV file beside the results.
    """
    node = {
        name: entry
        for name, entry in (node or {}).items()
        if entry is not None and not str(entry.get("_target_", "")).endswith("CSVLogger")
    }
    if not node or not rows:
        return
    with open_loggers(node, **overrides) as loggers:
        log_table(loggers, key, rows, markdown)
        log_images(loggers, plots or {})
