"""Hydra multirun: one results table for the whole sweep.

:class:`CollectResults` is a Hydra callback (registered in ``conf/hydra/default.yaml``): when a
multirun ends it reads every job's result file (``run.json`` of sample.py, ``metrics.json`` of
evaluate.py and train.py) and the job's overrides (``.hydra/overrides.yaml``), and writes

- ``<sweep dir>/results.csv`` and ``results.md``: one row per job, the swept settings (overrides whose
  value differs between jobs) and the results (sampler, steps, NFE, FID, KID, ..., images/s);
- ``<sweep dir>/fid_vs_nfe.png`` when the jobs report FID at two or more NFEs (evaluate.py sweeps);
- the table and plot to the configured loggers (W&B: a ``sweep`` run in the sweep's group).

It reads files rather than job return values because launchers run jobs in other processes or on
other machines (joblib, SLURM): the files are what reaches the machine that started the sweep.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from fastsample.jobs.benchmark import plot
from fastsample.lit.tracking import group_name, log_summary
from fastsample.utils.io import write_bytes_atomic

log = logging.getLogger(__name__)

RESULT_FILES = ("run.json", "metrics.json")
#: what a row reports, in this order (those present in the sweep's result files)
SUMMARY_COLUMNS = (
    "sampler",
    "steps",
    "nfe",
    "schedule",
    "samples",
    "num_samples",
    "fid",
    "kid_mean",
    "is_mean",
    "precision",
    "recall",
    "class_accuracy",
    "wall_time_s",
    "sampling_s",
    "images_per_s",
)
#: overrides that repeat a summary column (dropped when the summary has it)
OVERRIDE_ALIASES = {"sampler": "sampler", "sampler.steps": "steps"}


def job_dirs(sweep_dir: Path) -> list[Path]:
    """The sweep's job directories (those holding a result file or Hydra's ``.hydra``), by job number."""
    found = [
        path
        for path in sweep_dir.iterdir()
        if path.is_dir() and ((path / ".hydra").is_dir() or any((path / f).is_file() for f in RESULT_FILES))
    ]
    return sorted(found, key=_job_order)


def _job_order(path: Path) -> tuple[bool, int, str]:
    """Numbered job folders by number (10 after 9), any others after them by name."""
    numbered = path.name.isdigit()
    return (not numbered, int(path.name) if numbered else 0, path.name)


def job_overrides(job_dir: Path) -> dict[str, str]:
    """``key -> value`` of the job's command-line overrides (``+key`` / ``++key`` as ``key``)."""
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}

    overrides = {}
    for item in OmegaConf.load(path):
        key, _, value = str(item).partition("=")
        overrides[key.lstrip("+~")] = value
    return overrides


def job_results(job_dir: Path) -> dict[str, Any] | None:
    """The scalar results of a job: top-level fields of its result file plus its ``metrics`` dict."""
    for name in RESULT_FILES:
        path = job_dir / name
        if path.is_file():
            data = json.loads(path.read_text())
            flat = {key: value for key, value in data.items() if _scalar(value)}
            flat.update({key: value for key, value in (data.get("metrics") or {}).items() if _scalar(value)})
            return flat
    return None


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (int, float, str, bool))


def collect_rows(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One row per job: ``job``, the swept overrides, the summary columns present, ``status``."""
    sweep_dir = Path(sweep_dir)
    jobs = [(path, job_overrides(path), job_results(path)) for path in job_dirs(sweep_dir)]
    swept = _swept_keys([overrides for _, overrides, _ in jobs])
    present = [c for c in SUMMARY_COLUMNS if any(results and c in results for _, _, results in jobs)]
    extra = sorted(
        {key for _, _, results in jobs for key, value in (results or {}).items() if _is_metric(key, value)}
        - set(present)
    )
    rows = []
    for path, overrides, results in jobs:
        row: dict[str, Any] = {"job": path.name}
        row.update({key: overrides.get(key) for key in swept if OVERRIDE_ALIASES.get(key) not in present})
        row.update({key: (results or {}).get(key) for key in [*present, *extra]})
        for key, column in OVERRIDE_ALIASES.items():  # a job without results still shows what it ran
            if column in row and row[column] is None and key in overrides:
                row[column] = overrides[key]
        row["status"] = "ok" if results is not None else "no result"
        rows.append(row)
    return rows


def _swept_keys(all_overrides: Sequence[Mapping[str, str]]) -> list[str]:
    """Override keys whose value differs between jobs (all of them when there is one job)."""
    keys = list(dict.fromkeys(key for overrides in all_overrides for key in overrides))
    if len(all_overrides) < 2:
        return keys
    return [key for key in keys if len({overrides.get(key) for overrides in all_overrides}) > 1]


def _is_metric(key: str, value: Any) -> bool:
    """Further numeric results worth a column (``kid_std``, ``recall``, training metrics...)."""
    skip = {"generated_this_run", "count", "kept_features", "rank", "world_size"}
    return isinstance(value, float) and key not in skip


def format_cell(value: Any) -> str:
    """Table text: 4 significant digits for floats, ``-`` for missing / NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def markdown_table(rows: Sequence[Mapping[str, Any]], title: str = "") -> str:
    """The rows as a markdown table (numbers right-aligned), under an optional title line."""
    if not rows:
        return title
    columns = list(rows[0])
    numeric = [
        all(isinstance(row.get(c), (int, float)) or row.get(c) is None for row in rows) for c in columns
    ]
    align = ["---:" if right else "---" for right in numeric]
    lines = [f"| {' | '.join(columns)} |", f"|{'|'.join(align)}|"]
    lines += [f"| {' | '.join(format_cell(row.get(c)) for c in columns)} |" for row in rows]
    return "\n".join(([title, ""] if title else []) + lines)


def csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as CSV (missing values empty)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else [])
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if value is None else value for key, value in row.items()})
    return buffer.getvalue()


def plot_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows for :func:`fastsample.jobs.benchmark.plot`: one series per setting other than the step count."""
    fixed = {"job", "status", "sampler.steps", *SUMMARY_COLUMNS}
    series_keys = [key for key in rows[0] if key not in fixed]
    points = []
    for row in rows:
        if row.get("fid") is None or row.get("nfe") is None:
            continue
        label = " ".join([str(row.get("sampler", "")), *(f"{key}={row[key]}" for key in series_keys)]).strip()
        time = row.get("sampling_s") if row.get("sampling_s") is not None else row.get("wall_time_s")
        points.append({"sampler": label or "run", "nfe": row["nfe"], "fid": row["fid"], "sampling_s": time})
    return points


def write_results(sweep_dir: str | Path, rows: Sequence[Mapping[str, Any]], title: str) -> dict[str, Path]:
    """Write ``results.csv``, ``results.md`` and (FID at 2+ NFEs) ``fid_vs_nfe.png``; returns the paths."""
    sweep_dir = Path(sweep_dir)
    paths = {"csv": sweep_dir / "results.csv", "markdown": sweep_dir / "results.md"}
    write_bytes_atomic(paths["csv"], csv_text(rows).encode())
    write_bytes_atomic(paths["markdown"], (markdown_table(rows, title) + "\n").encode())
    points = plot_rows(rows)
    if len({point["nfe"] for point in points}) >= 2 and all(p["sampling_s"] is not None for p in points):
        paths["plot"] = sweep_dir / "fid_vs_nfe.png"
        plot(paths["plot"], points, title)
    return paths


class CollectResults(Callback):
    """Hydra callback: at the end of a multirun, collect every job's results into one table.

    Args:
        log: also send the table (and the FID-vs-NFE plot) to the sweep's configured loggers.
    """

    def __init__(self, log: bool = True) -> None:
        self.log = log

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            log.warning("sweep directory %s does not exist; no results table written", sweep_dir)
            return
        rows = collect_rows(sweep_dir)
        if not rows:
            return
        title = f"{config.get('task_name', 'sweep')}: {len(rows)} jobs in {sweep_dir}"
        paths = write_results(sweep_dir, rows, title)
        print(f"\n{markdown_table(rows)}\n\nsweep results: {paths['csv']} | {paths['markdown']}", flush=True)
        if self.log:
            self.log_to_loggers(config, sweep_dir, rows, title, paths)

    @staticmethod
    def log_to_loggers(
        config: DictConfig, sweep_dir: Path, rows: list[dict], title: str, paths: dict[str, Path]
    ) -> None:
        """The table and plot as a ``sweep`` run of the configured loggers (W&B: in the sweep's group)."""

        log_summary(
            config.get("logger"),
            rows,
            markdown_table(rows, title),
            key="sweep/results",
            plots={"sweep/fid_vs_nfe": paths["plot"]} if "plot" in paths else None,
            save_dir=str(sweep_dir),
            name=f"{config.get('task_name', 'sweep')}-sweep",
            group=group_name(sweep_dir),
            job_type="sweep",
        )
