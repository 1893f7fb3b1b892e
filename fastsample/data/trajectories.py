"""Teacher ODE trajectories for DSNO: generation in resumable chunks and a DataModule that reads them.

A trajectory is the teacher sampler's state at ``M + 1`` levels ``sigma_0 > sigma_1 > ... > sigma_M = 0``
(``sigma_0`` = the start, ``x_T = sigma_0 * z``; ``sigma_M = 0`` = the sample), recorded exactly at
solver nodes (:func:`fastsample.samplers.sample_trajectory` inserts the levels into the grid). The
levels come from a schedule spec ("times", DSNO's quadratic spacing by default: the paper's
``t_k = ((M - k) / M)^2``) over the teacher's trained range.

Storage (a folder): ``meta.json`` (format, teacher identity and weights fingerprint, data shape, levels,
sampler, label mode, dtype) and one ``chunks/seeds-A-B.npz`` per block of ``chunk_size`` seeds (states
``(n, M + 1, C, H, W)``, labels, seeds, generation seconds and teacher NFE), each written atomically
(:mod:`fastsample.utils.io`), as ``sample.py`` writes its shards. A rerun generates only the chunks
that are missing: an interrupted generation resumes without duplicating or losing a trajectory, and a
larger ``count`` adds chunks. Reading takes exactly the planned chunks, in seed order, and checks
each one's seeds. Trajectories of another teacher, shape, level set or sampler are refused.

Noise comes from per-seed streams (:class:`fastsample.utils.seeding.SeedNoise`): trajectory ``s`` is
the same whatever the chunk size. Training and validation trajectories use far-apart seed ranges, away
from the seeds 0, 1, ... that evaluation samples with, so an operator is never scored on its
training noise.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from fastsample.data.datamodule import per_device_batch_size
from fastsample.diffusion.denoiser import CountingDenoiser
from fastsample.diffusion.schedules import ScheduleSpec, make_sigmas, schedule_file_sigmas, validate_sigmas
from fastsample.models.dsno import teacher_record
from fastsample.samplers import Sampler, sample_trajectory
from fastsample.samplers.sampler import _schedule_spec
from fastsample.utils.device import resolve_device
from fastsample.utils.errors import check_choice, check_range, fail
from fastsample.utils.instantiation import instantiate
from fastsample.utils.io import remove_stale_temporaries, save_npz_atomic, write_json_atomic
from fastsample.utils.seeding import SeedNoise, labels_for

log = logging.getLogger(__name__)

TRAJECTORY_FORMAT = "fastsample-trajectories-v1"
DTYPES = ("float32", "float16")


# -- levels ---------------------------------------------------------------------------------------------


def trajectory_sigmas(times: Any, frames: int, model: Any) -> Tensor:
    """The ``M + 1`` float64 levels of a trajectory: ``sigma_0`` (start), then M outputs ending at 0.

    ``times`` is a schedule spec (a kind name such as ``quadratic``, or a dict / :class:`ScheduleSpec`)
    evaluated with ``M + 1`` points over ``model``'s range, the last replaced by 0: ``quadratic`` gives
    DSNO's ``t_k = ((M - k) / M)^2`` on the DDPM time axis. ``explicit`` / ``file`` take ``M + 1``
    values that end at 0.
    """
    check_range("dataset.M", frames, low=1)
    spec = _schedule_spec(times)
    if spec.kind == "explicit":
        return validate_sigmas(spec.sigmas, frames, setting="dataset.times.sigmas")
    if spec.kind == "file":
        return schedule_file_sigmas(spec.path, frames)
    levels = make_sigmas(spec, frames, model, append_zero=False).clone()
    levels[-1] = 0.0
    return levels


def plan_chunks(first_seed: int, count: int, chunk_size: int) -> list[list[int]]:
    """Seeds ``first_seed .. first_seed + count - 1`` in blocks aligned to multiples of ``chunk_size``.

    Aligned blocks keep every full chunk's name when ``count`` grows; only a trailing partial block
    is replaced by a longer one (the shorter file is then no longer part of the plan and is ignored).
    """
    check_range("dataset.chunk_size", chunk_size, low=1)
    seeds = list(range(first_seed, first_seed + count))
    return [seeds[i : i + chunk_size] for i in range(0, len(seeds), chunk_size)]


def describe_sampler(sampler: Sampler) -> dict[str, Any]:
    """What identifies the teacher sampler (JSON-ready): name, steps, schedule and knobs."""
    schedule = dataclasses.asdict(sampler.schedule) if dataclasses.is_dataclass(sampler.schedule) else {}
    return _plain(
        {"name": sampler.name, "steps": sampler.steps, "schedule": schedule, "knobs": sampler.knobs}
    )


def _plain(value: Any) -> Any:
    """JSON-normalized data (tuples -> lists, numpy / tensors -> numbers), so metadata compares exactly."""
    return json.loads(json.dumps(value, default=lambda item: getattr(item, "tolist", lambda: str(item))()))


# -- storage ----------------------------------------------------------------------------------------------


class TrajectoryStore:
    """A trajectory folder: ``meta.json`` plus one ``chunks/seeds-A-B.npz`` per block of seeds."""

    def __init__(self, root: str | os.PathLike, setting: str = "dataset.path") -> None:
        self.root, self.setting = Path(root), setting

    @property
    def meta_path(self) -> Path:
        return self.root / "meta.json"

    def chunk_path(self, seeds: Sequence[int]) -> Path:
        return self.root / "chunks" / f"seeds-{seeds[0]:010d}-{seeds[-1]:010d}.npz"

    def read_meta(self) -> dict[str, Any] | None:
        if not self.meta_path.is_file():
            return None
        try:
            return json.loads(self.meta_path.read_text())
        except (OSError, ValueError) as err:
            fail(f"{self.setting}={str(self.root)!r}: meta.json is unreadable ({err}); remove the folder")

    def claim(self, meta: dict[str, Any]) -> None:
        """Write ``meta`` for a new folder, or check that an existing folder holds the same kind of data
        (and clear the temporary files of killed generations)."""
        stored = self.read_meta()
        if stored is None:
            write_json_atomic(self.meta_path, meta)
            return
        check_meta(stored, meta, f"{self.setting}={str(self.root)!r}")
        remove_stale_temporaries(self.root / "chunks")

    def missing(self, chunks: Sequence[Sequence[int]]) -> list[Sequence[int]]:
        return [chunk for chunk in chunks if not self.chunk_path(chunk).is_file()]

    def load(self, chunks: Sequence[Sequence[int]], meta: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """States ``(N, M + 1, C, H, W)`` (float32) and labels ``(N,)`` of the planned chunks, by seed."""
        missing = self.missing(chunks)
        if missing:
            fail(
                f"{self.setting}={str(self.root)!r} lacks {len(missing)} of {len(chunks)} chunks (first: "
                f"{self.chunk_path(missing[0]).name}); generate them (TrajectoryDataModule.prepare_data)"
            )
        expected = (meta["M"] + 1, *meta["shape"])
        states, labels = [], []
        for chunk in chunks:
            path = self.chunk_path(chunk)
            try:
                with np.load(path, allow_pickle=False) as data:
                    chunk_states, chunk_labels, seeds = data["states"], data["labels"], data["seeds"]
            except (OSError, ValueError, KeyError) as err:
                fail(f"trajectory chunk {path} is unreadable ({err}); delete it and rerun to regenerate it")
            if list(seeds) != list(chunk) or tuple(chunk_states.shape) != (len(chunk), *expected):
                fail(
                    f"trajectory chunk {path} holds seeds {int(seeds[0])}..{int(seeds[-1])} with states "
                    f"{tuple(chunk_states.shape)}; expected seeds {chunk[0]}..{chunk[-1]} with "
                    f"{(len(chunk), *expected)}; delete it and rerun to regenerate it"
                )
            states.append(torch.from_numpy(chunk_states.astype(np.float32)))
            labels.append(torch.from_numpy(chunk_labels.astype(np.int64)))
        return torch.cat(states), torch.cat(labels)

    def cost(self, chunks: Sequence[Sequence[int]]) -> dict[str, float]:
        """Generation cost of the chunks that exist: trajectories, teacher NFE per batch, seconds."""
        seconds, trajectories, nfe = 0.0, 0, 0
        for chunk in chunks:
            path = self.chunk_path(chunk)
            if path.is_file():
                with np.load(path, allow_pickle=False) as data:
                    seconds += float(data["seconds"])
                    nfe = max(nfe, int(data["nfe"]))
                trajectories += len(chunk)
        return {"trajectories": trajectories, "teacher_nfe_per_trajectory": nfe, "generation_s": seconds}


def check_meta(stored: dict[str, Any], wanted: dict[str, Any], where: str) -> None:
    """Fail, naming the first difference, unless stored trajectories are of the wanted kind."""
    if stored.get("format") != TRAJECTORY_FORMAT:
        fail(f"{where} is not a trajectory folder of this version (format {stored.get('format')!r})")
    fix = "use another dataset.path (or dataset.path=null: one cache folder per configuration)"
    teacher, other = stored["teacher"], wanted["teacher"]
    if teacher["fingerprint"] != other["fingerprint"]:
        fail(
            f"{where} holds trajectories of a different model ({teacher['identity']}, weights "
            f"{teacher['fingerprint']}) than this teacher ({other['identity']}, weights "
            f"{other['fingerprint']}); {fix}"
        )
    if stored["shape"] != wanted["shape"]:
        fail(
            f"{where} holds trajectories of shape {stored['shape']}, but the teacher makes "
            f"{wanted['shape']}; {fix}"
        )
    if stored["M"] != wanted["M"] or stored["sigmas"] != wanted["sigmas"]:
        fail(
            f"{where} holds M={stored['M']} points at sigmas {fmt_levels(stored['sigmas'])}, but "
            f"dataset.M={wanted['M']} / dataset.times give {fmt_levels(wanted['sigmas'])}; {fix}"
        )
    for key, setting in (
        ("sampler", "dataset.sampler"),
        ("class_labels", "dataset.class_labels"),
        ("dtype", "dataset.dtype"),
    ):
        if stored.get(key) != wanted.get(key):
            fail(
                f"{where} was made with {setting}={stored.get(key)}, but this run asks for "
                f"{wanted.get(key)}; {fix}"
            )


def fmt_levels(levels: Sequence[float]) -> str:
    return "[" + ", ".join(f"{float(level):.4g}" for level in levels) + "]"


# -- generation -------------------------------------------------------------------------------------------


def generate_chunk(
    sampler: Sampler,
    teacher: Any,
    seeds: Sequence[int],
    sigmas: Tensor,
    labels: Tensor | None,
    device: torch.device,
) -> tuple[Tensor, int]:
    """The trajectories of ``seeds``: states ``(n, M + 1, ...)`` at ``sigmas``, and the teacher calls made."""
    shape = tuple(teacher.image_shape)
    noise = SeedNoise(seeds)
    x = noise.randn(shape, device=device) * float(sigmas[0])
    counting = CountingDenoiser(teacher)
    cond = {"class_labels": labels.to(device)} if labels is not None else None
    grid = sampler.sigmas(teacher)
    with torch.no_grad():
        _, states = sample_trajectory(sampler, counting, x, grid, sigmas.tolist(), cond=cond, generator=noise)
    return states.transpose(0, 1).contiguous(), counting.calls


def generate_trajectories(
    store: TrajectoryStore,
    teacher: Any,
    sampler: Sampler,
    sigmas: Tensor,
    chunks: Sequence[Sequence[int]],
    *,
    class_labels: Any = None,
    dtype: str = "float32",
    device: torch.device | str = "cpu",
    progress: bool = True,
    after_chunk: Callable[[Path], None] | None = None,
) -> int:
    """Generate the missing chunks of ``chunks`` (atomic files); returns how many trajectories were made.

    ``after_chunk(path)`` is called after each chunk is written (progress reporting; tests use it to
    simulate an interruption).
    """

    check_choice("dataset.dtype", dtype, DTYPES)
    device = torch.device(device)
    todo = store.missing(chunks)
    made = 0
    for chunk in tqdm(todo, desc="teacher trajectories", unit="chunk", disable=not progress or len(todo) < 2):
        labels = labels_for(list(chunk), class_labels, getattr(teacher, "num_classes", None))
        start = time.perf_counter()
        states, calls = generate_chunk(sampler, teacher, chunk, sigmas, labels, device)
        seconds = time.perf_counter() - start
        if not bool(torch.isfinite(states).all()):
            fail(f"the teacher produced non-finite trajectory states for seeds {chunk[0]}..{chunk[-1]}")
        save_npz_atomic(
            store.chunk_path(chunk),
            states=states.cpu().numpy().astype(dtype),
            labels=(labels if labels is not None else torch.full((len(chunk),), -1)).numpy().astype(np.int64),
            seeds=np.asarray(chunk, dtype=np.int64),
            seconds=np.float64(seconds),
            nfe=np.int64(calls),
        )
        made += len(chunk)
        if after_chunk is not None:
            after_chunk(store.chunk_path(chunk))
    return made


# -- the DataModule ---------------------------------------------------------------------------------------


def _resolve_device(name: str) -> torch.device:

    return resolve_device(name)


class TrajectoryDataModule(pl.LightningDataModule):
    """Teacher trajectories as training data (``conf/trajectories``; ``train.py task=dsno`` uses it).

    ``prepare_data`` generates what is missing (once, on one process); ``setup`` reads and checks it.
    Items are ``(states (M + 1, C, H, W), label)`` with ``label = -1`` for unconditional trajectories.

    Args:
        teacher: the model (a config, built on first use, or a denoiser).
        sampler: the teacher's ODE sampler (a :class:`Sampler` config or object).
        M: output points per trajectory (stored: ``M + 1`` with the start).
        times: the levels' schedule spec (see :func:`trajectory_sigmas`).
        count / val_count: training / validation trajectories.
        seed_offset / val_seed_offset: the first seed of each set (far from evaluation seeds).
        class_labels: ``null`` (the model's null label), ``cycle`` (seed mod classes) or a class index.
        chunk_size: trajectories per chunk file (and per generation batch).
        path: the folder; ``null``: ``<cache_dir>/trajectories/<hash of the configuration>``.
        dtype: storage precision (float32 | float16).
        device: where the teacher runs (auto | cpu | cuda).
    """

    def __init__(
        self,
        teacher: Any,
        sampler: Any,
        M: int = 4,
        times: Any = "quadratic",
        count: int = 10000,
        val_count: int = 256,
        seed_offset: int = 100_000_000,
        val_seed_offset: int = 200_000_000,
        class_labels: Any = None,
        chunk_size: int = 256,
        path: str | None = None,
        cache_dir: str = ".cache",
        dtype: str = "float32",
        device: str = "auto",
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        super().__init__()
        check_range("dataset.M", M, low=1)
        check_range("dataset.count", count, low=1)
        check_range("dataset.val_count", val_count, low=0)
        check_range("dataset.batch_size", batch_size, low=1)
        check_range("dataset.num_workers", num_workers, low=0)
        check_choice("dataset.dtype", dtype, DTYPES)
        if seed_offset < val_seed_offset < seed_offset + count:
            fail(
                f"dataset.val_seed_offset={val_seed_offset} falls inside the training seeds "
                f"{seed_offset}..{seed_offset + count - 1}; use a value outside them"
            )
        self._teacher_config = teacher if isinstance(teacher, (dict, DictConfig)) else None
        self._teacher = None if self._teacher_config is not None else teacher
        self.sampler: Sampler = instantiate(sampler) if isinstance(sampler, (dict, DictConfig)) else sampler
        self.M, self.times = int(M), _plain_config(times)
        self.count, self.val_count = int(count), int(val_count)
        self.seed_offset, self.val_seed_offset = int(seed_offset), int(val_seed_offset)
        self.class_labels, self.chunk_size, self.dtype = class_labels, int(chunk_size), dtype
        self.path, self.cache_dir, self.device_name = path, cache_dir, device
        self.batch_size, self.num_workers, self.seed, self.progress = batch_size, num_workers, seed, progress
        self._meta: dict[str, Any] | None = None
        self._sets: dict[str, TensorDataset] = {}

    # -- what the data is ------------------------------------------------------------------------------
    def teacher_model(self) -> Any:
        """The teacher denoiser (built from its config on first use), in eval mode, frozen."""
        if self._teacher is None:
            self._teacher = instantiate(self._teacher_config)
            self._teacher = self._teacher.to(_resolve_device(self.device_name)).eval().requires_grad_(False)
        return self._teacher

    @property
    def data_shape(self) -> tuple[int, ...]:
        """(C, H, W) of one state (the teacher's data shape)."""
        shape = getattr(self.teacher_model(), "image_shape", None)
        if shape is None:
            fail("dataset.teacher does not declare its data shape; DSNO needs an image model")
        return tuple(shape)

    def sigmas(self) -> Tensor:
        """The ``M + 1`` levels, checked to start where the teacher sampler starts."""
        teacher = self.teacher_model()
        levels = trajectory_sigmas(self.times, self.M, teacher)
        start = float(self.sampler.sigmas(teacher)[0])
        if abs(float(levels[0]) - start) > 1e-9 * start:
            fail(
                f"dataset.times start at sigma {float(levels[0]):.6g} but dataset.sampler starts at "
                f"{start:.6g}; give both the same sigma_max"
            )
        levels[0] = start  # exactly the sampler's first level (the time-table round trip is inexact)
        return levels

    def metadata(self) -> dict[str, Any]:
        """What identifies these trajectories (stored as meta.json and checked on reuse)."""
        if self._meta is None:
            teacher = self.teacher_model()
            sampler = describe_sampler(self.sampler)
            self._meta = {
                "format": TRAJECTORY_FORMAT,
                "teacher": _plain(teacher_record(teacher)),
                "shape": list(self.data_shape),
                "M": self.M,
                "sigmas": [float(s) for s in self.sigmas()],
                "times": _plain(self.times),
                "sampler": sampler,
                "teacher_nfe": self.sampler.spec.count_nfe(self.sampler.steps, self.sampler.knobs)
                if hasattr(self.sampler, "spec")
                else None,
                "class_labels": self.class_labels,
                "dtype": self.dtype,
            }
        return self._meta

    @property
    def root(self) -> Path:
        """The trajectory folder: ``path``, or a cache folder named by a hash of :meth:`metadata`."""
        if self.path:
            return Path(self.path)
        meta = self.metadata()
        key = {k: meta[k] for k in ("teacher", "shape", "M", "sigmas", "sampler", "class_labels", "dtype")}
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
        return (
            Path(self.cache_dir)
            / "trajectories"
            / f"{meta['teacher']['identity'].get('class', 'model')}-{digest}"
        )

    @property
    def store(self) -> TrajectoryStore:
        return TrajectoryStore(self.root, "dataset.path" if self.path else "trajectory cache")

    def chunks(self, split: str) -> list[list[int]]:
        """The planned chunks (seed blocks) of ``split`` ('train' or 'val')."""
        check_choice("split", split, ("train", "val"))
        if split == "train":
            return plan_chunks(self.seed_offset, self.count, self.chunk_size)
        return plan_chunks(self.val_seed_offset, self.val_count, self.chunk_size) if self.val_count else []

    def generation_cost(self) -> dict[str, float]:
        """Trajectories present, teacher NFE per trajectory and the generation seconds they took."""
        store = self.store
        train, val = store.cost(self.chunks("train")), store.cost(self.chunks("val"))
        return {
            "trajectories": train["trajectories"] + val["trajectories"],
            "teacher_nfe_per_trajectory": max(
                train["teacher_nfe_per_trajectory"], val["teacher_nfe_per_trajectory"]
            ),
            "generation_s": train["generation_s"] + val["generation_s"],
        }

    # -- Lightning hooks ---------------------------------------------------------------------------------
    def prepare_data(self, after_chunk: Callable[[Path], None] | None = None) -> None:
        """Generate the missing chunks of both splits (resumes an interrupted generation)."""
        store = self.store
        store.claim(self.metadata())
        chunks = self.chunks("train") + self.chunks("val")
        todo = store.missing(chunks)
        if todo:
            log.info("generating %d trajectory chunks in %s", len(todo), store.root)
        generate_trajectories(
            store,
            self.teacher_model(),
            self.sampler,
            torch.tensor(self.metadata()["sigmas"], dtype=torch.float64),
            chunks,
            class_labels=self.class_labels,
            dtype=self.dtype,
            device=_resolve_device(self.device_name),
            progress=self.progress,
            after_chunk=after_chunk,
        )

    def setup(self, stage: str | None = None) -> None:
        """Check the stored metadata and read the splits into memory."""
        store, meta = self.store, self.metadata()
        stored = store.read_meta()
        if stored is None:
            fail(f"no trajectories at {store.root}; run prepare_data() (train.py does) to generate them")
        check_meta(stored, meta, f"{store.setting}={str(store.root)!r}")
        for split in ("train", "val"):
            if split not in self._sets and self.chunks(split):
                self._sets[split] = TensorDataset(*store.load(self.chunks(split), meta))

    def dataset(self, split: str) -> TensorDataset:
        if split not in self._sets:
            self.setup()
        if split not in self._sets:
            fail(f"there are no {split} trajectories (dataset.val_count=0)")
        return self._sets[split]

    @property
    def device_batch_size(self) -> int:
        world = self.trainer.world_size if self.trainer is not None else 1
        return per_device_batch_size(self.batch_size, world)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            self.dataset(split),
            batch_size=self.device_batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            generator=generator,
            persistent_workers=self.num_workers > 0,
            drop_last=shuffle and len(self.dataset(split)) >= self.device_batch_size,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val", shuffle=False) if self.val_count else []


def _plain_config(value: Any) -> Any:
    if isinstance(value, (DictConfig,)) or OmegaConf.is_config(value):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, ScheduleSpec):
        return dataclasses.asdict(value)
    return value
