"""The training job behind ``train.py``: data, task module, trainer, callbacks, loggers; fit; export."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from fastsample.data.datamodule import per_device_batch_size
from fastsample.lit.checkpoint_io import AtomicCheckpointIO
from fastsample.lit.resume import ResumeState
from fastsample.lit.tracking import finish_runs, resolved_config
from fastsample.utils.errors import brief, fail
from fastsample.utils.instantiation import instantiate, instantiate_group
from fastsample.utils.io import write_json_atomic


def resolve_checkpoint(ckpt_path: str | None, output_dir: Path) -> str | None:
    """``last`` resumes from ``<output_dir>/checkpoints/last.ckpt`` if it exists (else starts fresh).

    The file is checked to be a readable Lightning training checkpoint before any training starts.
    """
    if ckpt_path in (None, "", "none"):
        return None
    if ckpt_path == "last":
        last = output_dir / "checkpoints" / "last.ckpt"
        if not last.exists():
            return None
        ckpt_path = str(last)
    elif not Path(ckpt_path).exists():
        fail(f"ckpt_path={ckpt_path!r} does not exist; use null, last, or an existing .ckpt file")
    check_training_checkpoint(ckpt_path)
    return ckpt_path


def check_training_checkpoint(path: str) -> None:
    """Fail unless ``path`` is a readable Lightning checkpoint (memory-mapped: tensors are not read)."""

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # truncated, not a zip archive, not a torch file
        fail(
            f"ckpt_path={path!r} is not a readable checkpoint ({brief(err)}); use another .ckpt "
            "(or ckpt_path=null to start over)"
        )
    if not isinstance(checkpoint, dict) or not {"state_dict", "global_step"} <= checkpoint.keys():
        fail(
            f"ckpt_path={path!r} is not a Lightning training checkpoint (a model.pt bundle or bare weights? "
            "those are for sample.py model.path=); use a .ckpt from a run's checkpoints/ folder"
        )


def checkpoint_plugins(trainer_cfg: DictConfig) -> dict[str, Any]:
    """Atomic checkpoint files (:class:`AtomicCheckpointIO`) unless the trainer config sets plugins."""
    if trainer_cfg.get("plugins"):
        return {}

    return {"plugins": [AtomicCheckpointIO()]}


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit ``cfg.task`` on ``cfg.dataset``; export the model; return the final logged metrics."""
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    output_dir = Path(cfg.output_dir)
    datamodule = instantiate(cfg.dataset)
    module = instantiate(cfg.task, _recursive_=False)
    check_shapes(module, datamodule)
    loggers = instantiate_group(cfg.get("logger"))
    trainer: pl.Trainer = instantiate(
        cfg.trainer,
        # ResumeState: random streams and the EMA update in checkpoints, so ckpt_path=last resumes exactly
        callbacks=[*instantiate_group(cfg.get("callbacks")), ResumeState()],
        logger=loggers or False,
        **checkpoint_plugins(cfg.trainer),
    )
    if isinstance(getattr(datamodule, "batch_size", None), int):  # fail before any process is launched
        per_device_batch_size(datamodule.batch_size, trainer.world_size)
    for logger in loggers:  # the whole run's settings, not only the task module's hyperparameters
        logger.log_hyperparams(resolved_config(cfg))
    ckpt_path = resolve_checkpoint(cfg.get("ckpt_path"), output_dir)
    status = "failed"
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        if cfg.get("export") and trainer.is_global_zero and hasattr(module, "export"):
            module.export(output_dir / "model.pt")
        status = "success"
    finally:
        finish_runs(loggers, status)  # the next job of a multirun must not log into this W&B run
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items() if value.numel() == 1}
    if trainer.is_global_zero:  # what a sweep's results table collects (fastsample.jobs.sweeps)
        write_json_atomic(output_dir / "metrics.json", {"mode": "train", "metrics": metrics})
    return metrics


def check_shapes(module: Any, datamodule: Any) -> None:
    """Fail early when the backbone's input shape or class count differs from the data's."""
    name = getattr(datamodule, "hparams", {}).get("name", type(datamodule).__name__)
    model_shape = getattr(module, "image_shape", None)
    data_shape = getattr(datamodule, "data_shape", None)
    if model_shape and data_shape and tuple(model_shape) != tuple(data_shape):
        fail(
            f"the network expects images of shape {tuple(model_shape)} but dataset {name!r} "
            f"gives {tuple(data_shape)}; set task.net.in_channels / task.net.image_size "
            "(or dataset.resolution)"
        )
    model_classes = getattr(module, "num_classes", None)
    if model_classes and hasattr(datamodule, "num_classes"):
        data_classes = datamodule.num_classes
        if data_classes is None:
            fail(
                f"task.net.num_classes={model_classes} needs class labels but dataset {name!r} has none "
                "(dataset.labels=false or unlabeled data); set task.net.num_classes=null or use labels"
            )
        if data_classes != model_classes:
            fail(
                f"task.net.num_classes={model_classes} but dataset {name!r} has {data_classes} classes; "
                f"set task.net.num_classes={data_classes}"
            )
