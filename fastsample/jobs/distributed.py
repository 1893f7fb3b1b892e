"""``sample.py`` and ``evaluate.py mode=generate`` over Lightning processes (``trainer=ddp_cpu`` /
``trainer=ddp``), built on :class:`fastsample.lit.sampling.SeedBatchModule`.

The seeds are cut into the same batches as a single-process run (:func:`fastsample.jobs.setup.plan`);
each rank takes a contiguous block of batches. ``sample.py``: every rank writes the shards of its
batches, then rank 0 streams them into ``samples.npz`` and writes ``grid.png`` and ``run.json``.
``evaluate.py``: every rank folds its images' features into a
:class:`~fastsample.metrics.FeatureStats`; the accumulators are merged in rank order.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from fastsample.guidance import GuidanceTask
from fastsample.jobs.sampling import finish_outputs, save_shard, shard_path
from fastsample.jobs.setup import Setup, plan
from fastsample.lit.sampling import SeedBatchModule, build_trainer
from fastsample.metrics.stats import FeatureStats, merge_states
from fastsample.utils.io import write_json_atomic
from fastsample.utils.run_state import claim_sample_dir

# --------------------------------------------------------------------------------------------------
# sample.py trainer=...


def generate_distributed(cfg: DictConfig) -> dict[str, Any] | None:
    """:func:`fastsample.jobs.sampling.generate` over Lightning processes; rank 0 returns the summary.

    The outputs are those of a single-process run with the same settings (the same shard files,
    ``samples.npz``, ``grid.png``); ``run.json`` adds ``world_size`` and the batches per rank.
    Other ranks return ``None``.
    """
    trainer = build_trainer(cfg.trainer)
    setup = plan(cfg, device=torch.device("cpu"))  # Lightning moves the model to each rank's device
    out_dir = Path(cfg.output_dir)
    shards = [shard_path(out_dir / "shards", batch) for batch in setup.batches]
    state: dict[str, Any] = {"generated": 0, "run_state": None}

    def start(module: SeedBatchModule) -> None:
        if module.global_rank == 0:  # one writer of run_state.json; the others wait at the barrier
            planned = {shard: len(batch) for shard, batch in zip(shards, setup.batches)}
            state["run_state"] = claim_sample_dir(cfg, out_dir, planned)

    def work(seeds: list[int], device: torch.device) -> None:
        shard = shard_path(out_dir / "shards", seeds)
        if shard.exists():
            return  # finished by an earlier, interrupted run of the same config
        # setup.model is the module Lightning moved to this rank's device (in place)
        save_shard(shard, setup.generate(seeds, device), setup.labels_for(seeds), seeds)
        state["generated"] += len(seeds)
        if state["run_state"] is not None:
            state["run_state"].progress()

    def payload() -> dict[str, Any]:
        costs = setup.guidance.stats.as_dict() if isinstance(setup.guidance, GuidanceTask) else {}
        return {"generated": state["generated"], "guidance": costs}

    module = SeedBatchModule(setup.model, setup.batches, work, start=start, payload=payload)
    trainer.predict(module, return_predictions=False)
    if not trainer.is_global_zero:
        return None
    finish_outputs(cfg, shards)
    summary = distributed_summary(cfg, setup, module)
    write_json_atomic(out_dir / "run.json", summary)
    if state["run_state"] is not None:
        state["run_state"].finish()
    return summary


def distributed_summary(cfg: DictConfig, setup: Setup, module: SeedBatchModule) -> dict[str, Any]:
    """run.json of a distributed run: the single-process summary plus the ranks' shares."""
    generated = sum(rank["payload"]["generated"] for rank in module.gathered)
    elapsed = max(rank["elapsed_s"] for rank in module.gathered)
    summary = {
        **setup.describe(),
        "samples": len(setup.seeds),
        "generated_this_run": generated,
        "wall_time_s": round(elapsed, 3),
        "images_per_s": round(generated / elapsed, 2) if generated and elapsed > 0 else None,
        "device": module.gathered[0]["device"],
        "world_size": len(module.gathered),
        "batches_per_rank": [rank["batches"] for rank in module.gathered],
        "output_dir": str(cfg.output_dir),
    }
    if "guidance" in summary:  # the costs of every rank's batches, as one process would count them
        costs = [rank["payload"]["guidance"] for rank in module.gathered]
        summary["guidance"].update({key: sum(cost.get(key, 0) for cost in costs) for key in costs[0]})
    return summary


# --------------------------------------------------------------------------------------------------
# evaluate.py mode=generate trainer=...


def score_sampler_distributed(
    trainer_cfg: DictConfig,
    evaluator: Any,
    setup: Setup,
    on_batch: Callable[[torch.Tensor], None] | None = None,
) -> dict[str, Any] | None:
    """:meth:`Evaluator.score_sampler` over Lightning processes; rank 0 returns the scores, others ``None``.

    Each rank generates its block of batches and folds the features into its own accumulator; the
    accumulators are merged in rank order, so the statistics (and the kept rows KID / PR / IS use)
    are those of one process up to float64 rounding. ``on_batch`` sees rank 0's images (the first
    seeds), e.g. for the preview grid.
    """
    stats = FeatureStats(evaluator.keep_features, evaluator.keep_logits)
    timer = {"sampling_s": 0.0}

    def start(module: SeedBatchModule) -> None:
        evaluator.extractor = evaluator.extractor.to(module.device)

    def work(chunk: list[int], device: torch.device) -> None:
        begin = time.perf_counter()
        images = setup.generate(chunk, device)
        if device.type == "cuda":  # time the sampling, not the launch of its kernels
            torch.cuda.synchronize(device)
        timer["sampling_s"] += time.perf_counter() - begin
        if on_batch is not None and module.global_rank == 0:
            on_batch(images)
        stats.merge(evaluator.features([images.float()], what=f"samples of {setup.sampler.name}"))

    def payload() -> dict[str, Any]:
        return {"stats": stats.state_dict(), "sampling_s": timer["sampling_s"]}

    module = SeedBatchModule(setup.model, setup.batches, work, start=start, payload=payload)
    trainer = build_trainer(trainer_cfg)
    trainer.predict(module, return_predictions=False)
    if not trainer.is_global_zero:
        return None
    merged = merge_states(rank["payload"]["stats"] for rank in module.gathered)
    # The ranks sample in parallel: the sampling time of the run is the slowest rank's.
    sampling_s = max(rank["payload"]["sampling_s"] for rank in module.gathered)
    results = evaluator.sampler_scores(merged, setup.sampler, setup.seeds, setup.labels, sampling_s)
    results["world_size"] = len(module.gathered)
    return results
