"""Ecosystem: one results table per sweep, W&B offline runs, distributed sampling / evaluation through
Lightning, and the network speed options (mixed precision, channels_last, torch.compile).

The command-line tests run sample.py / evaluate.py as subprocesses (Hydra multirun, Lightning DDP on
the CPU with gloo) on the analytic 2-D mixture, so they cost process start-up, not sampling.
W&B never goes online here: no API key, no netrc, WANDB_SILENT.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import socket
import struct
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

from fastsample.diffusion.accel import NetworkOptions, NetworkWrapper, apply_network_options
from fastsample.jobs.distributed import score_sampler_distributed
from fastsample.jobs.setup import Setup
from fastsample.jobs.sweeps import CollectResults, collect_rows, write_results
from fastsample.lit.sampling import build_trainer, rank_block
from fastsample.lit.tracking import group_name, log_job, wandb_offline
from fastsample.metrics import ModuleFeatures
from fastsample.metrics.evaluator import Evaluator
from fastsample.metrics.stats import FeatureStats, merge_states
from fastsample.samplers import Sampler
from fastsample.utils.errors import UserError
from fastsample.utils.seeding import SeedNoise

ROOT = Path(__file__).resolve().parents[1]


def compose_config(name: str, *overrides: str, hydra: bool = False):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose(name, overrides=list(overrides), return_hydra_config=hydra)


def offline_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a CLI run: one thread, and W&B without any credentials (offline, silent)."""
    env = {key: value for key, value in os.environ.items() if key not in ("WANDB_API_KEY", "WANDB_MODE")}
    env.update(
        OMP_NUM_THREADS="1",
        OMP_WAIT_POLICY="PASSIVE",
        WANDB_SILENT="true",
        WANDB_CONSOLE="off",
        NETRC=str(tmp_path / "no-netrc"),
        MPLBACKEND="Agg",
        FASTSAMPLE_DEBUG="1",
    )
    return env


def run_script(script: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def wandb_records(path: Path) -> list:
    """The protobuf records of an offline ``run-*.wandb`` file (LevelDB-log framing after a 7-byte header).

    Parsing every record is a stronger check than the directory layout: ``wandb sync`` uploads
    exactly these records.
    """
    from wandb.proto import wandb_internal_pb2

    data, records, payload, position, block = path.read_bytes(), [], b"", 7, 32768
    assert len(data) < 7 or data[:4] == b":W&B"  # shorter: the header is still being written
    while position + 7 <= len(data):
        left = block - position % block
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if left < 7 or (length == 0 and kind == 0):  # block trailer / padding
            position += left
            continue
        if position + 7 + length > len(data):
            break  # a record still being written
        payload += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last fragment of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            records.append(record)
            payload = b""
    return records


def of_kind(records: list, kind: str) -> list:
    return [getattr(record, kind) for record in records if record.WhichOneof("record_type") == kind]


def history(records: list) -> dict[str, str]:
    """Logged values by key (keys with ``/`` are stored as nested keys)."""
    items = [item for entry in of_kind(records, "history") for item in entry.item]
    return {item.key or "/".join(item.nested_key): item.value_json for item in items}


def offline_without_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """This process as a machine without W&B credentials: W&B must go offline by itself."""
    for name in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")


def offline_run(folder: Path) -> Path:
    runs = sorted(folder.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 1, runs
    return runs[0]


def finished_run(folder: Path, timeout_s: float = 120.0) -> list:
    """The records of the one offline run under ``folder``, once its exit record is on disk.

    ``finish()`` returns when W&B's service has handled the exit; its writer may append the last
    records to the file a moment later (seen on a loaded machine), hence the bounded wait.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        records = wandb_records(offline_run(folder))
        if of_kind(records, "exit") or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def run_ranks(target: Callable[[int], None], world_size: int = 2) -> None:
    """Run ``target(rank)`` in ``world_size`` forked processes with the environment torchrun / SLURM
    give their ranks (Lightning then joins them into one gloo group instead of launching processes).

    Forking skips the interpreter start-up and imports a launched script pays (~10 s per process).
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = multiprocessing.get_context("fork")
    ranks = [
        context.Process(target=_rank_main, args=(target, rank, world_size, port))
        for rank in range(world_size)
    ]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(timeout=600)
    assert [process.exitcode for process in ranks] == [0] * world_size


def _rank_main(target: Callable[[int], None], rank: int, world_size: int, port: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world_size),
        NODE_RANK="0",
        LOCAL_RANK=str(rank),
    )
    code = 0
    try:
        target(rank)
    except BaseException:
        traceback.print_exc()
        code = 1
    os._exit(code)  # no pytest / atexit teardown in a forked child


class FeaturesAndLogits(nn.Module):
    """A fixed random feature map with logits: enough for FID, KID, PR, IS and class accuracy."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head = nn.Linear(64, 16), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = torch.tanh(self.embed(x.flatten(1)))
        return features, self.head(features)


# --------------------------------------------------------------------------------------------------
# Distributed sampling and evaluation


def test_two_processes_sample_exactly_what_one_process_samples(tmp_path):
    """Lightning DDP (gloo, 2 CPU processes): per-seed noise makes the shards independent of the rank."""
    settings = ["model=gmm_toy", "sampler=dpmpp_2m_sde", "sampler.steps=4", "seeds=0-13", "batch_size=3"]
    run_script(
        "sample.py",
        *settings,
        "trainer=ddp_cpu",
        f"hydra.run.dir={tmp_path / 'ddp'}",
        env=offline_env(tmp_path),
    )
    from fastsample.jobs.sampling import generate

    generate(compose_config("sample", *settings, f"output_dir={tmp_path / 'one'}"))
    run = json.loads((tmp_path / "ddp" / "run.json").read_text())
    assert run["world_size"] == 2 and run["batches_per_rank"] == [3, 2]  # 5 batches, contiguous blocks
    assert run["generated_this_run"] == 14
    shards = sorted(path.name for path in (tmp_path / "ddp" / "shards").iterdir())
    assert shards == sorted(path.name for path in (tmp_path / "one" / "shards").iterdir())
    with np.load(tmp_path / "ddp" / "samples.npz") as two, np.load(tmp_path / "one" / "samples.npz") as one:
        assert two["seeds"].tolist() == list(range(14))
        for key in ("images", "labels", "seeds"):
            np.testing.assert_array_equal(two[key], one[key])


@pytest.mark.parametrize(("count", "world_size"), [(5, 2), (7, 3), (2, 4), (8, 1)])
def test_rank_blocks_cover_every_batch_once_in_order(count, world_size):
    blocks = [list(rank_block(count, rank, world_size)) for rank in range(world_size)]
    assert sum(blocks, []) == list(range(count))
    assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


@pytest.mark.parametrize("keep", [1000, 25])
def test_rank_statistics_merge_to_the_single_process_statistics(keep):
    """Contiguous blocks merged in rank order: the same moments (float64 rounding) and kept rows."""
    generator = torch.Generator().manual_seed(0)
    batches = [
        torch.randn(12, 6, generator=generator) * 3 + 50 for _ in range(5)
    ]  # large mean: no cancellation
    logits = [torch.randn(12, 4, generator=generator) for _ in range(5)]
    single = FeatureStats(keep, keep)
    for features, scores in zip(batches, logits):
        single.update(features, scores)
    states = []
    for rank in range(2):
        mine = FeatureStats(keep, keep)
        for index in rank_block(len(batches), rank, 2):
            mine.update(batches[index], logits[index])
        states.append(mine.state_dict())
    merged = merge_states(states)
    assert merged.count == single.count == 60
    np.testing.assert_allclose(merged.mu, single.mu, rtol=1e-13)
    np.testing.assert_allclose(merged.sigma, single.sigma, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(merged.features, single.features)
    np.testing.assert_array_equal(merged.logits, single.logits)


def test_two_rank_evaluation_reduces_to_the_single_process_scores(tmp_path, tiny_net_factory):
    """Each rank scores a contiguous block of seed batches; the merged statistics give the same scores."""
    generator = torch.Generator().manual_seed(1)
    evaluator = Evaluator(
        ModuleFeatures(FeaturesAndLogits()), kid_subsets=5, kid_subset_size=10, pr_k=3, is_splits=2
    )
    evaluator.reference = evaluator.build_reference(torch.rand(120, 1, 8, 8, generator=generator) * 2 - 1)
    model, sampler, seeds = tiny_net_factory(), Sampler("dpmpp_2m", 3), list(range(30))
    labels = torch.tensor([seed % 10 for seed in seeds])
    settings = {"shape": (1, 8, 8), "class_labels": labels}
    one = evaluator.score_sampler(model, sampler, seeds, 5, **settings)
    trainer = OmegaConf.create({"_target_": "pytorch_lightning.Trainer", "accelerator": "cpu", "devices": 2})

    def rank_job(rank: int) -> None:
        setup = Setup(torch.device("cpu"), torch.float32, model, sampler, None, (1, 8, 8), seeds, 5, "cycle")
        scores = score_sampler_distributed(trainer, evaluator, setup)
        assert (scores is None) == (rank != 0)
        if rank == 0:
            (tmp_path / "scores.json").write_text(json.dumps(scores))

    run_ranks(rank_job)
    two = json.loads((tmp_path / "scores.json").read_text())
    assert two["world_size"] == 2 and two["num_samples"] == one["num_samples"] == 30
    assert two["fid"] == pytest.approx(one["fid"], rel=1e-9)
    for key in ("kid_mean", "kid_std", "precision", "recall", "is_mean", "is_std", "class_accuracy", "nfe"):
        assert two[key] == one[key], key  # computed from the same kept rows, in the same order


def test_launches_that_cannot_run_a_sampling_job_are_refused():
    spawn = {
        "_target_": "pytorch_lightning.Trainer",
        "accelerator": "cpu",
        "devices": 2,
        "strategy": "ddp_spawn",
    }
    with pytest.raises(UserError, match="strategy=ddp"):
        build_trainer(OmegaConf.create(spawn))


@pytest.mark.slow
def test_two_process_evaluation_cli_scores_like_one_process(tmp_path):
    """evaluate.py mode=generate trainer=ddp_cpu: features of both ranks reduced into one set of scores."""
    from fastsample.jobs.evaluation import evaluate

    settings = [
        "mode=generate",
        "model=gmm_digits",
        "dataset=digits",
        "features=module",
        "features.module._target_=torch.nn.Flatten",
        "seeds=0-99",
        "batch_size=25",
        "sampler.steps=4",
        f"paths.cache_dir={tmp_path / 'cache'}",
        "evaluator.kid_subsets=10",
        "evaluator.kid_subset_size=50",
        "progress=false",
    ]
    one = evaluate(compose_config("evaluate", *settings, f"output_dir={tmp_path / 'one'}"))["metrics"]
    env = offline_env(tmp_path)
    run_script("evaluate.py", *settings, "trainer=ddp_cpu", f"hydra.run.dir={tmp_path / 'ddp'}", env=env)
    two = json.loads((tmp_path / "ddp" / "metrics.json").read_text())["metrics"]
    assert two["world_size"] == 2 and two["num_samples"] == one["num_samples"] == 100
    assert two["fid"] == pytest.approx(one["fid"], rel=1e-7)
    for key in ("kid_mean", "kid_std", "precision", "recall"):  # the kept rows, in the same order
        assert two[key] == one[key]
    assert (tmp_path / "ddp" / "grid.png").is_file()


# --------------------------------------------------------------------------------------------------
# Sweeps: one table; W&B: offline runs, one group per sweep


def test_multirun_of_two_samplers_by_two_step_counts_writes_one_table(tmp_path):
    sweep = tmp_path / "sweep"
    run_script(
        "sample.py",
        "-m",
        "model=gmm_toy",
        "sampler=euler,heun",
        "sampler.steps=2,3",
        "seeds=0-3",
        f"hydra.sweep.dir={sweep}",
        env=offline_env(tmp_path),
    )
    with open(sweep / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["sampler"], row["steps"], row["nfe"]) for row in rows] == [
        ("euler", "2", "2"),
        ("euler", "3", "3"),
        ("heun", "2", "3"),  # Heun: 2 steps - 1
        ("heun", "3", "5"),
    ]
    assert all(row["status"] == "ok" and float(row["images_per_s"]) > 0 for row in rows)
    assert "| euler | 2 | 2 |" in (sweep / "results.md").read_text()
    assert not list(sweep.rglob("wandb"))  # no logger by default


def test_sweep_jobs_share_a_wandb_group_and_the_table_is_a_run_of_it(tmp_path, monkeypatch):
    """Two jobs of one multirun in one process (as the basic launcher runs them): two finished offline
    runs in the sweep's group, then the callback's table run in the same group."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    offline_without_credentials(monkeypatch, tmp_path)
    sweep = tmp_path / "multirun" / "sample" / "2025-01-01_00-00-00"
    for job, sampler in enumerate(["euler", "heun"]):
        overrides = ["logger=wandb", "model=gmm_toy", f"sampler={sampler}", f"output_dir={sweep / str(job)}"]
        cfg = compose_config("sample", *overrides, f"hydra.sweep.dir={sweep}", hydra=True)
        with open_dict(cfg):
            cfg.hydra.mode = "MULTIRUN"
            cfg.hydra.job.override_dirname = f"sampler={sampler}"
        HydraConfig.instance().set_config(cfg)
        try:
            log_job(cfg, {"nfe": 2 + job}, "sample")
        finally:
            HydraConfig.instance().cfg = None
        (sweep / str(job) / "run.json").write_text(
            json.dumps({"sampler": sampler, "steps": 2, "nfe": 2 + job})
        )
    runs = [of_kind(finished_run(sweep / str(job)), "run")[0] for job in range(2)]
    assert {run.run_group for run in runs} == {"sample-2025-01-01_00-00-00"} == {group_name(sweep)}
    assert [run.display_name for run in runs] == ["sample[sampler=euler]", "sample[sampler=heun]"]

    CollectResults().on_multirun_end(cfg)
    assert len(list(csv.DictReader((sweep / "results.csv").open()))) == 2
    summary = finished_run(sweep)
    (run,) = of_kind(summary, "run")
    assert run.run_group == group_name(sweep) and run.job_type == "sweep"
    assert history(summary)["sweep/results/nrows"] == "2"


def test_evaluate_sweep_table_has_swept_columns_fid_plot_and_missing_jobs(tmp_path):
    """The collector on evaluate.py-style job folders (metrics.json + .hydra/overrides.yaml)."""
    for job, (sampler, steps, nfe, fid) in enumerate(
        [("euler", 4, 4, 3.0), ("euler", 8, 8, 1.5), ("heun", 4, 7, 2.0), ("heun", 8, 15, 1.0)]
    ):
        folder = tmp_path / str(job)
        (folder / ".hydra").mkdir(parents=True)
        overrides = ["mode=generate", f"sampler={sampler}", f"sampler.steps={steps}", "guidance.scale=2"]
        (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {item}\n" for item in overrides))
        metrics = {"fid": fid, "kid_mean": fid / 100, "nfe": nfe, "sampling_s": 0.1 * nfe}
        summary = {"mode": "generate", "sampler": sampler, "steps": steps, "nfe": nfe, "metrics": metrics}
        (folder / "metrics.json").write_text(json.dumps(summary))
    (tmp_path / "4" / ".hydra").mkdir(parents=True)  # a job that never wrote its results
    failed = ["mode=generate", "sampler=unipc", "sampler.steps=4", "guidance.scale=2"]
    (tmp_path / "4" / ".hydra" / "overrides.yaml").write_text("".join(f"- {item}\n" for item in failed))
    rows = collect_rows(tmp_path)
    assert [row["job"] for row in rows] == ["0", "1", "2", "3", "4"]
    assert list(rows[0]) == ["job", "sampler", "steps", "nfe", "fid", "kid_mean", "sampling_s", "status"]
    assert [row["fid"] for row in rows] == [3.0, 1.5, 2.0, 1.0, None]
    assert rows[4]["status"] == "no result" and rows[4]["sampler"] == "unipc"  # from its overrides
    paths = write_results(tmp_path, rows, "test sweep")
    assert paths["plot"].stat().st_size > 0
    assert "| 4 | unipc | 4 | - | - | - | - | no result |" in paths["markdown"].read_text()


def test_wandb_is_offline_unless_credentials_or_wandb_mode_say_otherwise(tmp_path, monkeypatch):
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    netrc = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc))
    assert wandb_offline("auto")  # no key, no netrc file
    netrc.write_text("machine example.com login user password secret\n")
    assert wandb_offline("auto")  # a netrc without the W&B host
    netrc.write_text("machine api.wandb.ai login user password 0123456789abcdef\n")
    assert not wandb_offline("auto")
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_offline("auto")
    monkeypatch.delenv("WANDB_MODE")
    netrc.unlink()
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef")
    assert not wandb_offline("auto") and wandb_offline("offline")
    with pytest.raises(UserError, match="logger.wandb.mode"):
        wandb_offline("sometimes")


def test_offline_wandb_run_holds_config_metrics_and_sample_grid(tmp_path, monkeypatch, tiny_net_factory):
    """A job's record (log_job): resolved config, <stage>/<metric> history, the grid as a media file."""
    from fastsample.utils.images import save_grid, to_uint8

    offline_without_credentials(monkeypatch, tmp_path)
    out = tmp_path / "run"
    cfg = compose_config("sample", "logger=wandb", "sampler=euler", "sampler.steps=3", f"output_dir={out}")
    seeds = list(range(16))
    with torch.no_grad():
        images = Sampler("euler", 3).sample(tiny_net_factory(), SeedNoise(seeds).randn((1, 8, 8)))
    save_grid(to_uint8(images), out / "grid.png")
    log_job(
        cfg,
        {"nfe": 3, "images_per_s": 12.5, "sampler": "euler"},
        "sample",
        images={"sample/grid": out / "grid.png"},
    )

    path = offline_run(out)
    records = finished_run(out)
    logged = history(records)
    assert float(logged["sample/nfe"]) == 3 and float(logged["sample/images_per_s"]) == 12.5
    config = {
        item.key: json.loads(item.value_json) for entry in of_kind(records, "config") for item in entry.update
    }
    assert config["sampler"]["name"] == "euler" and config["sampler"]["steps"] == 3
    assert config["output_dir"] == str(out)  # resolved, not "${paths.output_dir}"
    assert of_kind(records, "exit")[0].exit_code == 0
    grids = list(path.parent.glob("files/media/images/sample/grid_*.png"))
    assert len(grids) == 1 and grids[0].stat().st_size > 0
    dry_run = subprocess.run(
        [str(Path(sys.executable).parent / "wandb"), "sync", "--dry-run", str(path.parent)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "WANDB_SILENT": "true"},
    )
    assert dry_run.returncode == 0 and "Would sync 1 run" in dry_run.stdout + dry_run.stderr


def test_default_jobs_log_nothing_and_configs_compose():
    """No logger / trainer by default (a plain run makes no wandb folder); launchers and searches compose."""
    for name in ("sample", "evaluate"):
        cfg = compose_config(name)
        assert cfg.get("logger") is None and cfg.get("trainer") is None
    slurm = compose_config("sample", "hydra/launcher=slurm", "hydra.launcher.gpus_per_node=4", hydra=True)
    assert slurm.hydra.launcher.tasks_per_node == 4  # one task (DDP rank) per GPU
    assert slurm.hydra.launcher._target_.endswith("SlurmLauncher")
    local = compose_config("evaluate", "hydra/launcher=local", hydra=True)
    assert local.hydra.launcher._target_.endswith("JoblibLauncher")
    search = compose_config("evaluate", "hparams_search=schedule_optuna", hydra=True)
    assert search.mode == "generate" and search.hydra.sweeper.direction == "minimize"
    assert "sampler.schedule.rho" in search.hydra.sweeper.params
    throughput = compose_config("sample", "hparams_search=throughput_optuna", hydra=True)
    assert throughput.hydra.sweeper.direction == "maximize"
    assert "CollectResults" in slurm.hydra.callbacks.collect_results._target_


# --------------------------------------------------------------------------------------------------
# Network speed options


def sample_with_states(model, sampler: str = "dpmpp_2m", steps: int = 6):
    """Samples of 8 seeds and the dtype of every solver state on the way."""
    dtypes = []
    noise = SeedNoise(range(8)).randn((1, 8, 8))
    with torch.no_grad():
        final = Sampler(sampler, steps).sample(
            model, noise, callback=lambda info: dtypes.append(info["x"].dtype)
        )
    return final, dtypes


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_low_precision_network_keeps_the_solver_state_float32(tiny_net_factory, precision):
    reference, _ = sample_with_states(tiny_net_factory())
    model = apply_network_options(tiny_net_factory(), NetworkOptions(network_precision=precision))
    assert isinstance(model, NetworkWrapper) and model.network_options == {"network_precision": precision}
    inner_calls = []
    model.inner.net.register_forward_hook(lambda module, args, output: inner_calls.append(output.dtype))
    final, dtypes = sample_with_states(model)
    assert final.dtype == torch.float32 and set(dtypes) == {torch.float32}
    assert set(inner_calls) == {getattr(torch, precision)}  # the network itself ran in low precision
    error = (final - reference).abs().max().item()
    assert 0 < error < 0.05 * reference.abs().max().item()


def test_channels_last_and_compile_are_wired_from_the_config(tiny_net_factory, tmp_path):
    """channels_last gives the same samples; compile (eager backend: fast) compiles the denoiser in place."""
    options = NetworkOptions(channels_last=True, compile=True, compile_backend="eager")
    model = apply_network_options(tiny_net_factory(), options)
    assert model.inner.net.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert model.inner._compiled_call_impl is not None
    final, _ = sample_with_states(model, steps=3)
    assert final.is_contiguous()
    unchanged, _ = sample_with_states(tiny_net_factory(), steps=3)
    torch.testing.assert_close(final, unchanged, rtol=1e-5, atol=1e-5)

    from fastsample.jobs.setup import build_model, describe_run

    cfg = compose_config("sample", "model=gmm_toy", "network_precision=bfloat16", f"output_dir={tmp_path}")
    mixture = build_model(cfg, torch.device("cpu"))
    assert isinstance(mixture, NetworkWrapper) and mixture.num_classes == mixture.inner.num_classes
    assert mixture.sample(4)[0].shape == (4, 2)  # methods of the wrapped model stay reachable
    described = describe_run(Sampler("euler", 2), mixture)
    assert described["network"] == {"network_precision": "bfloat16"}
    assert described["model"] == mixture.inner.identity()  # schedule files still match the model
    with pytest.raises(UserError, match="network_precision"):
        NetworkOptions(network_precision="float8")


@pytest.mark.parametrize(("given", "expected"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_import_makes_openmp_threads_sleep_unless_told(given: str | None, expected: str):
    """``import fastsample`` (the entry points' first import) sets OMP_WAIT_POLICY=PASSIVE before torch
    loads, so direct ``python sample.py`` runs get what the Makefile exports; an explicit value wins."""
    env = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    if given is not None:
        env["OMP_WAIT_POLICY"] = given
    code = "import os, fastsample; print(os.environ['OMP_WAIT_POLICY'])"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    assert result.stdout.strip() == expected, result.stderr
