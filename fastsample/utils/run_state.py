"""The run state of a resumable job folder: what it was made with, how far it got, what is finished.

A job that writes its results in parts (``sample.py``'s shards) keeps ``run_state.json`` beside them:

- ``settings``: the resolved settings that determine the results (a flat ``{"sampler.steps": 10, ...}``)
  and ``config_hash``, their SHA-1;
- ``progress``: finished parts and items (samples) of the planned ones; ``finished``: the part names;
- ``status`` (``running`` / ``finished``), ``attempts`` (how many runs worked on the folder), timestamps.

The state is written (atomically) right before the first part, so a part on disk always has a state
beside it, and a run that fails before it has produced anything (a setting refused at the first batch)
writes nothing: the corrected rerun finds the folder as it was. A state whose folder holds no part at
all (a run killed before its first part) does not bind the folder either: a rerun with other settings
takes it over, as nothing could mix. A rerun into the same folder with the same settings resumes: only
missing parts are made. A rerun with different settings is refused, naming the first setting that
differs, because its parts would be mixed with the old ones under the same names. The parts on disk
are the truth: the state's ``finished`` list is refreshed from them (at most every few seconds while
running) and may lag a killed run by one interval; it is a report, never used to skip work.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from fastsample.utils.errors import fail
from fastsample.utils.io import remove_stale_temporaries, write_json_atomic

STATE_FILE = "run_state.json"
STATE_FORMAT = "fastsample-run-state-v1"
#: settings named like this never change results (where caches live, progress bars)
IGNORED_LEAVES = frozenset({"cache_dir", "progress"})
#: top-level sample.py settings that do not change which samples are made: where outputs and logs go,
#: the preview grid, the schedule search's settings (another mode), sweeps, the dataset (used only
#: through guidance.data, which is resolved into the guidance settings), and where / how fast the
#: network runs (device, processes, memory format, compilation): a resumed CPU run may continue on a
#: GPU, the samples then agree up to float rounding. ``precision`` and ``network_precision`` count.
SAMPLE_IGNORED = frozenset(
    {
        "output_dir",
        "paths",
        "hydra",
        "task_name",
        "grid_size",
        "schedule_search",
        "hparams_search",
        "dataset",
        "logger",
        "device",
        "trainer",
        "channels_last",
        "compile",
        "compile_mode",
        "compile_backend",
    }
)


def job_settings(cfg: Mapping | DictConfig, ignore: Iterable[str] = ()) -> dict[str, Any]:
    """The resolved settings of ``cfg`` as a flat, JSON-ready ``{"a.b": value}`` dict.

    Top-level keys in ``ignore`` and leaves named in :data:`IGNORED_LEAVES` are left out (and never
    resolved, so an interpolation there that cannot resolve outside Hydra does not matter).
    """
    ignore = set(ignore)
    flat: dict[str, Any] = {}
    for key in _keys(cfg):
        if key not in ignore:
            _flatten(_child(cfg, key), str(key), flat)
    return json.loads(json.dumps(flat, default=str))


def _keys(node: Any) -> list[Any]:
    return list(node.keys()) if isinstance(node, (Mapping, DictConfig)) else list(range(len(node)))


def _child(node: Any, key: Any) -> Any:
    try:
        return node[key]
    except MissingMandatoryValue:
        return "???"


def _flatten(node: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(node, (Mapping, DictConfig, list, tuple, ListConfig)) and len(node):
        for key in _keys(node):
            if key not in IGNORED_LEAVES:
                _flatten(_child(node, key), f"{prefix}.{key}", out)
        return
    out[prefix] = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def settings_hash(settings: Mapping[str, Any]) -> str:
    """SHA-1 of the settings (sorted JSON): equal settings, equal hash."""
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class RunState:
    """``run_state.json`` of a job folder whose results are the files ``parts`` (part -> items in it).

    Args:
        root: the job folder (``output_dir``).
        kind: what the job is (``sample``); a folder of another kind is refused.
        settings: the job's settings (:func:`job_settings`).
        parts: the planned part files and how many items (samples) each holds.
        interval_s: the least time between two progress writes while running.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        kind: str,
        settings: Mapping[str, Any],
        parts: Mapping[Path, int],
        interval_s: float = 2.0,
    ) -> None:
        self.root, self.kind, self.settings = Path(root), kind, dict(settings)
        self.parts = {Path(part): int(items) for part, items in parts.items()}
        self.interval_s = interval_s
        self.attempts, self.created = 1, _now()
        self._written = -float("inf")
        self._started = False

    @property
    def path(self) -> Path:
        return self.root / STATE_FILE

    @property
    def where(self) -> str:
        return f"output_dir={str(self.root)!r}"

    def read(self) -> dict[str, Any] | None:
        """The stored state, or None when there is none; an unreadable file is a UserError."""
        if not self.path.is_file():
            return None
        try:
            stored = json.loads(self.path.read_text())
        except (OSError, ValueError) as err:
            fail(f"{self.where}: {STATE_FILE} is unreadable ({err}); use another output_dir")
        if not isinstance(stored, dict) or stored.get("format") != STATE_FORMAT:
            fail(f"{self.where}: {STATE_FILE} is not a fastsample run state; use another output_dir")
        return stored

    def claim(self, start: bool = True) -> RunState:
        """Start or resume the folder: refuse another job's folder, clear dead writers' temporaries.

        With ``start=False`` nothing is written yet: the job calls :meth:`start` right before it writes
        its first part (:meth:`progress` and :meth:`finish` start it too), so a run that fails before
        producing anything leaves the folder untouched.
        """
        stored = self.read()
        if stored is None:
            self._refuse_unowned_parts()
        elif self._holds_parts() or stored.get("kind") != self.kind:
            self._check_same_job(stored)
            self.attempts = int(stored.get("attempts", 0)) + 1
            self.created = stored.get("created", self.created)
        # else: a state without a single part (a run killed before its first): nothing can mix, take over
        for folder in {part.parent for part in self.parts} | {self.root}:
            remove_stale_temporaries(folder)
        if start:
            self.start()
        return self

    def start(self) -> None:
        """Write the ``running`` state (once): call before the first part is written."""
        if not self._started:
            self.write("running")

    def _holds_parts(self) -> bool:
        """Whether the part folders hold any finished file (temporaries aside), of this run or another."""
        for folder in {part.parent for part in self.parts}:
            if folder.is_dir() and any(not name.startswith(".") for name in os.listdir(folder)):
                return True
        return False

    def _refuse_unowned_parts(self) -> None:
        present = [part for part in self.parts if part.exists()]
        if present:
            fail(
                f"{self.where} holds {len(present)} finished parts (e.g. {present[0].name}) "
                f"but no {STATE_FILE}, so the settings they were made with are unknown; use another "
                f"output_dir, or delete {present[0].parent} to start over"
            )

    def _check_same_job(self, stored: dict[str, Any]) -> None:
        where = self.where
        if stored.get("kind") != self.kind:
            fail(f"{where} holds a {stored.get('kind')} run, not a {self.kind} run; use another output_dir")
        if stored.get("config_hash") == settings_hash(self.settings):
            return
        old, new = stored.get("settings", {}), self.settings
        differing = sorted(key for key in old.keys() | new.keys() if _show(old, key) != _show(new, key))
        if not differing:  # a state written by a tool that hashed differently
            fail(f"{where} holds a {self.kind} run with other settings; use another output_dir")
        first = differing[0]
        more = f" (and {len(differing) - 1} more settings)" if len(differing) > 1 else ""
        fail(
            f"{where} holds a {self.kind} run made with {first}={_show(old, first)}, but this run has "
            f"{first}={_show(new, first)}{more}; rerun with the same settings to resume it, or choose "
            "another output_dir"
        )

    def finished_parts(self) -> list[Path]:
        """The planned parts present on disk (one directory listing per folder)."""
        listings: dict[Path, set[str]] = {}
        for folder in {part.parent for part in self.parts}:
            listings[folder] = set(os.listdir(folder)) if folder.is_dir() else set()
        return [part for part in self.parts if part.name in listings[part.parent]]

    def progress(self) -> None:
        """Record progress, at most every ``interval_s`` seconds (call after each finished part)."""
        if not self._started or time.monotonic() - self._written >= self.interval_s:
            self.write("running")

    def finish(self, **extra: Any) -> None:
        """Record that every part is done (and ``extra`` facts, e.g. the outputs written)."""
        self.write("finished", **extra)

    def write(self, status: str, **extra: Any) -> None:
        finished = self.finished_parts()
        state = {
            "format": STATE_FORMAT,
            "kind": self.kind,
            "status": status,
            "config_hash": settings_hash(self.settings),
            "settings": self.settings,
            "progress": {
                "parts_done": len(finished),
                "parts_total": len(self.parts),
                "items_done": sum(self.parts[part] for part in finished),
                "items_total": sum(self.parts.values()),
            },
            "finished": [part.name for part in finished],
            "attempts": self.attempts,
            "created": self.created,
            "updated": _now(),
            "writer": {"host": socket.gethostname(), "pid": os.getpid()},
            **extra,
        }
        write_json_atomic(self.path, state)
        self._written, self._started = time.monotonic(), True


def _show(settings: Mapping[str, Any], key: str) -> str:
    return repr(settings[key]) if key in settings else "<unset>"


def claim_sample_dir(
    cfg: Mapping | DictConfig, out_dir: Path, shards: Mapping[Path, int], start: bool = True
) -> RunState:
    """The run state of ``sample.py``'s ``out_dir`` with planned ``shards`` (file -> seeds), claimed
    (``start=False``: checked now, written by :meth:`RunState.start` before the first shard)."""
    return RunState(out_dir, "sample", job_settings(cfg, SAMPLE_IGNORED), shards).claim(start=start)
