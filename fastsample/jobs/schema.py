"""Typed settings of the entry points, checked right after Hydra composes the config.

``sample.py``, ``evaluate.py`` and ``train.py`` call :func:`validate` first (through
:mod:`fastsample.jobs.cli`, under ``run_cli``): the composed config is merged into the structured
configs below (OmegaConf dataclasses), so ``batch_size=abc``, ``batch_size=2.5``, ``sampler.steps=ten``,
``sampler.schedule.rho=abc`` or ``dataset.download=maybe`` end with one ``error:`` line naming the
setting and what it takes, before any model loads or any file is written. A quoted number
(``batch_size='12'``) is converted. Values are checked for type here; ranges and choices stay where
they are used (``check_range`` / ``check_choice``), so a setting has one rule.

What is typed: every top-level scalar of the three entry points (``conf/sample.yaml``,
``conf/evaluate.yaml``, ``conf/train.yaml``, ``conf/generation/default.yaml``) and the common keys of
the group nodes (the sampler's ``steps`` and ``schedule``, the data set's numbers, the schedule
search's, the trainer's step counts, ...). Group nodes stay open: a sampler's own knobs, a new config
group (``tune``) or a key another config adds pass untouched, so a new setting needs no schema change.
Nodes with a ``_target_`` (model, guidance, data set, task, features) must only hold parameters of
that target: ``+model.model_channels=32`` on a mixture model is refused naming the parameters it has,
instead of failing deep inside Hydra's instantiation. Top-level keys a command line adds with ``+``
that no entry point knows are refused too (Hydra already refuses unknown keys without ``+``).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from dataclasses import dataclass, field
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_object
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException, ValidationError

from fastsample.utils.errors import fail
from fastsample.utils.seeding import parse_seeds


# -- group nodes: open (unknown keys pass), null allowed (the code's own checks decide) ----------------
@dataclass
class ScheduleSchema:
    kind: str | None = "karras"
    rho: float | None = 7.0
    sigma_min: float | None = None
    sigma_max: float | None = None
    spacing: str | None = "leading"
    convention: str | None = "ddim"
    steps_offset: int | None = 0
    final_sigmas_type: str | None = "zero"
    sigmas: list[float] | None = None
    path: str | None = None


@dataclass
class SamplerSchema:
    name: str | None = "dpmpp_2m"
    steps: int | None = 10
    schedule: ScheduleSchema | None = None


@dataclass
class ModelSchema:
    sigma_min: float | None = None
    sigma_max: float | None = None
    image_shape: list[int] | None = None
    num_classes: int | None = None


@dataclass
class DatasetSchema:
    name: str | None = "fashion_mnist"
    root: str | None = None
    download: bool | None = False
    resolution: int | None = None
    channels: int | None = None
    labels: bool | None = None
    batch_size: int | None = 128
    num_workers: int | None = 0
    hflip: bool | None = False
    subset: int | None = None
    val_subset: int | None = None
    seed: int | None = 0


@dataclass
class TeacherSchema:
    sampler: str | None = "dpmpp_3m"
    substeps: int | None = 2


@dataclass
class GitsSchema:
    refine_sweeps: int | None = 3
    refine_trajectories: int | None = None


@dataclass
class AysSchema:
    init: str | None = "gits"
    iterations: int | None = 50
    lr: float | None = 0.1
    trajectories: int | None = 128


@dataclass
class QualitySchema:
    init: str | None = "loglinear"
    iterations: int | None = 40
    lr: float | None = 0.05
    samples: int | None = 128
    seed_offset: int | None = 400000
    validate_every: int | None = 5
    split: str | None = "train"
    real_features: int | None = 2000


@dataclass
class ScheduleSearchSchema:
    method: str | None = "gits"
    candidates: int | None = 100
    batch_size: int | None = 128
    progress: bool | None = True
    output: str | None = None
    teacher: TeacherSchema | None = None
    gits: GitsSchema | None = None
    ays: AysSchema | None = None
    quality: QualitySchema | None = None


@dataclass
class EvaluatorSchema:
    scores: list[str] | None = field(default_factory=lambda: ["fid", "is", "kid", "pr"])
    keep_features: int | None = 10000
    keep_logits: int | None = 50000
    kid_subsets: int | None = 100
    kid_subset_size: int | None = 1000
    pr_k: int | None = 3
    is_splits: int | None = 10


@dataclass
class TrainerSchema:
    max_steps: int | None = 10000
    max_epochs: int | None = None
    log_every_n_steps: int | None = 50
    check_val_every_n_epoch: int | None = 1
    gradient_clip_val: float | None = None
    accumulate_grad_batches: int | None = 1


@dataclass
class TaskSchema:
    lr: float | None = 5e-4
    warmup_steps: int | None = 200
    weight_decay: float | None = 0.0
    ema_decay: float | None = 0.999


# -- the entry points (their top-level keys) ------------------------------------------------------------
@dataclass
class GenerationSchema:
    """conf/generation/default.yaml: shared by sample.py and evaluate.py."""

    device: str = "auto"
    precision: str = "float32"
    network_precision: str = "float32"
    channels_last: bool = False
    compile: bool = False
    compile_mode: str = "default"
    compile_backend: str = "inductor"
    class_labels: Any = None  # null | cycle | a class index (checked by labels_for)
    shape: list[int] | None = None
    grid_size: int = 64
    output_dir: str = MISSING
    task_name: str = MISSING
    seeds: Any = "0-255"  # str | int | list: parsed (and checked) by parse_seeds
    batch_size: int = 128
    model: ModelSchema | None = None
    sampler: SamplerSchema | None = None
    dataset: DatasetSchema | None = None


@dataclass
class SampleSchema(GenerationSchema):
    mode: str = "generate"
    schedule_search: ScheduleSearchSchema | None = None


@dataclass
class EvaluateSchema(GenerationSchema):
    mode: str = "score"
    samples: str | None = None
    ref: str | None = None
    split: str = "train"
    progress: bool = True
    evaluator: EvaluatorSchema | None = None


@dataclass
class TrainSchema:
    task_name: str = "train"
    seed: int = 0
    ckpt_path: str | None = None
    export: bool = True
    optimized_metric: str | None = None
    output_dir: str = MISSING
    dataset: DatasetSchema | None = None
    trainer: TrainerSchema | None = None
    task: TaskSchema | None = None


SCHEMAS: dict[str, type] = {"sample": SampleSchema, "evaluate": EvaluateSchema, "train": TrainSchema}
#: group nodes whose keys must be parameters of their ``_target_``
TARGET_NODES = {"sample": ("model", "guidance"), "evaluate": ("model", "guidance", "features"), "train": ()}
#: ``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?|mps")
#: how an error message names what a field of each type takes
TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def validate(cfg: DictConfig, entry: str) -> DictConfig:
    """Check ``cfg`` (composed for ``entry``: sample | evaluate | train) against its schema, in place.

    Wrong types and unknown parameters of a target are UserErrors naming the setting; quoted numbers
    are converted in ``cfg``. Returns ``cfg``.
    """
    schema = SCHEMAS[entry]
    refuse_added_keys(cfg, entry)
    typed = typed_view(schema, cfg)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), typed)
    except ValidationError as err:
        raise_type_error(err, schema, cfg)
    write_back(cfg, typed, merged, "")
    if "seeds" in cfg and entry != "train":
        parse_seeds(cfg.seeds)  # seeds=abc / -5 / 2.5: before anything runs
    if isinstance(cfg.get("device"), str) and not DEVICE.fullmatch(cfg.device):
        fail(f"device={cfg.device!r} is not allowed; choose auto, cpu, cuda, cuda:N or mps")
    for name in TARGET_NODES[entry]:
        check_target_parameters(cfg.get(name), name)
    return cfg


def typed_view(schema: type, node: DictConfig) -> dict[str, Any]:
    """The values of ``node`` that ``schema`` types (nested schemas recursively); interpolations that do
    not resolve here (``${hydra:...}`` outside a Hydra run) are left out. An integral float given for an
    integer (``trainer.max_steps=1e5``) counts as that integer; ``2.5`` stays a float and is refused."""
    view: dict[str, Any] = {}
    hints = typing.get_type_hints(schema)
    for item in dataclasses.fields(schema):
        if item.name not in node:
            continue
        try:
            value = node[item.name]
            inner = nested_schema(hints[item.name])
            if inner is not None and isinstance(value, DictConfig):
                view[item.name] = typed_view(inner, value)
            elif OmegaConf.is_config(value):
                view[item.name] = OmegaConf.to_container(value, resolve=True)
            else:
                view[item.name] = int(value) if is_integral(value, hints[item.name]) else value
        except OmegaConfBaseException:
            continue
    return view


def is_integral(value: Any, annotation: Any) -> bool:
    """An integral float (``1e5``) given for an ``int`` field."""
    accepted = (annotation, *typing.get_args(annotation))
    return int in accepted and float not in accepted and isinstance(value, float) and value.is_integer()


def nested_schema(annotation: Any) -> type | None:
    """The dataclass in ``annotation`` (``X`` or ``X | None``), or None for a plain type."""
    candidates = [annotation, *typing.get_args(annotation)]
    return next((c for c in candidates if dataclasses.is_dataclass(c)), None)


def raise_type_error(err: ValidationError, schema: type, cfg: DictConfig) -> None:
    """One line for OmegaConf's validation error: the setting, its value and the type it takes."""
    key = re.sub(r"\[\d+\]$", "", str(getattr(err, "full_key", "") or ""))  # a list item: name the list
    value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False) if key else None
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    annotation, default = field_of(schema, key)
    wanted = type_name(annotation)
    example = f"; e.g. {key}={format_value(default)}" if default not in (None, MISSING) else ""
    fail(f"{key}={value!r} is not {wanted}{example}")


def field_of(schema: type, key: str) -> tuple[Any, Any]:
    """The annotation and default of the schema field at the dotted ``key``."""
    annotation, default, current = None, None, schema
    for part in re.sub(r"\[\d+\]", "", key).split("."):
        if current is None or not dataclasses.is_dataclass(current):
            return annotation, None
        hints = typing.get_type_hints(current)
        found = next((f for f in dataclasses.fields(current) if f.name == part), None)
        if found is None:
            return annotation, None
        annotation = hints[part]
        default = found.default if found.default is not dataclasses.MISSING else None
        if found.default_factory is not dataclasses.MISSING:
            default = found.default_factory()
        current = nested_schema(annotation)
    return annotation, default


def type_name(annotation: Any) -> str:
    """``an integer``, ``a number``, ``a list of integers``, ... (of ``X`` or ``X | None``)."""
    args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    optional = type(None) in typing.get_args(annotation)
    base = args[0] if optional and len(args) == 1 else annotation
    if typing.get_origin(base) is list:
        (item,) = typing.get_args(base) or (Any,)
        name = f"a list of {TYPE_NAMES.get(item, 'values').split(' ', 1)[-1]}s"
    else:
        name = TYPE_NAMES.get(base, "a value of another type")
    return name


def format_value(value: Any) -> str:
    """A value as it is written on the command line."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(map(str, value)) + "]"
    return str(value)


def write_back(cfg: DictConfig, typed: dict[str, Any], merged: DictConfig, prefix: str) -> None:
    """Put converted values into ``cfg``: a quoted ``'12'`` that became 12, an integral ``1e5`` given
    for an integer. Other numbers stay as written (``rho: 7`` is not rewritten as 7.0), so run states
    and schedule files keep the values the user gave."""
    for key, value in typed.items():
        converted = merged.get(key)
        if isinstance(value, dict) and isinstance(converted, DictConfig):
            write_back(cfg, value, converted, f"{prefix}{key}.")
        elif (
            converted is not None
            and type(converted) is not type(cfg_value(cfg, f"{prefix}{key}"))
            and (isinstance(value, str) or isinstance(value, int) and isinstance(converted, int))
        ):
            OmegaConf.update(cfg, f"{prefix}{key}", converted, merge=False)


def cfg_value(cfg: DictConfig, key: str) -> Any:
    """The value at ``key`` (None when it does not resolve here)."""
    try:
        return OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
    except OmegaConfBaseException:
        return None


def refuse_added_keys(cfg: DictConfig, entry: str) -> None:
    """Top-level keys added on the command line with ``+`` that no entry point knows (a typo Hydra lets
    through because of the ``+``). Only under a Hydra run: the overrides are Hydra's."""
    if not HydraConfig.initialized():
        return
    known = {f.name for schema in SCHEMAS.values() for f in dataclasses.fields(schema)}
    for override in HydraConfig.get().overrides.task:
        if not override.startswith("+") or "=" not in override:
            continue
        key = override.lstrip("+").split("=", 1)[0]
        if (
            "." not in key
            and "@" not in key
            and key not in known
            and not isinstance(cfg.get(key), DictConfig)
        ):
            fail(f"{key} is not a setting of {entry}.py (conf/{entry}.yaml); check its spelling, drop the +")


def check_target_parameters(node: Any, setting: str) -> None:
    """Refuse keys of ``node`` (and of nested nodes with a ``_target_``) that its target cannot take."""
    if not isinstance(node, DictConfig) or "_target_" not in node:
        return
    parameters = target_parameters(node._target_)
    if parameters is not None:
        unknown = [key for key in node if not str(key).startswith("_") and key not in parameters]
        if unknown:
            allowed = ", ".join(name for name in parameters if not name.startswith("_")) or "none"
            fail(
                f"{setting}.{unknown[0]} is not a setting of {setting} ({node._target_}); "
                f"its settings: {allowed}"
            )
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            check_target_parameters(child, f"{setting}.{key}")


def target_parameters(target: Any) -> list[str] | None:
    """The keyword parameters of ``target`` (a dotted path), or None when it takes any (``**kwargs``) or
    cannot be inspected here (an import error is reported when the model is built)."""
    if not isinstance(target, str):
        return None
    try:
        signature = inspect.signature(get_object(target))
    except Exception:  # unimportable, or a builtin without a signature: instantiation reports it
        return None
    kinds = {parameter.kind for parameter in signature.parameters.values()}
    if inspect.Parameter.VAR_KEYWORD in kinds:
        return None
    return [
        name
        for name, parameter in signature.parameters.items()
        if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)
    ]
