"""Reliability: jobs killed with SIGKILL at random points resume to the same result, outputs are never
partial under their final names, a full disk is one clear line, and numerical failures name their step.

The fault-injection tests start real processes (``sample.py``, ``train.py``, trajectory generation),
wait for seeded random amounts of progress (polling the output folder, not sleeping a fixed time) and
kill them. The fast tests each kill once; ``@pytest.mark.slow`` variants kill repeatedly at random
points, including the final merge.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from fastsample.data.datasets import FASHION_MNIST
from fastsample.guidance.base import ExtremeGuidanceWarning, warn_extreme_scale
from fastsample.guidance.classifier import MixturePosteriorGuidance
from fastsample.jobs.sampling import generate
from fastsample.jobs.training import train
from fastsample.lit.checkpoint_io import AtomicCheckpointIO
from fastsample.metrics import ModuleFeatures
from fastsample.metrics.resumable import parts_dir_for
from fastsample.models.gmm import GaussianMixture
from fastsample.samplers import Sampler
from fastsample.utils.errors import NumericalError, UserError
from fastsample.utils.io import _host_tag, remove_stale_temporaries, save_npz_atomic
from fastsample.utils.run_state import STATE_FILE
from fastsample.utils.seeding import SeedNoise

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
# 60 shards of a 2-D mixture with a 40-step Heun sampler: long enough to be killed mid-run.
SAMPLE_ARGS = ("model=gmm_toy", "sampler=heun", "sampler.steps=40", "seeds=0-359", "batch_size=6")
SHARDS = 60
FMNIST_PRESENT = any(Path(FASHION_MNIST.system_dir).glob("t10k-images-idx3-ubyte*"))
TRAIN_INTERVAL = 4
TRAIN_STEPS = 60
TRAIN_ARGS = (
    "dataset=digits",
    "dataset.subset=256",
    "dataset.batch_size=32",
    "task=diffusion",
    "net@task.net=unet_tiny",
    "callbacks.sample_grid=null",
    "trainer=cpu",
    f"trainer.max_steps={TRAIN_STEPS}",
    "trainer.limit_val_batches=0",
    "trainer.log_every_n_steps=1",
    "+trainer.enable_progress_bar=false",
    f"callbacks.model_checkpoint.every_n_train_steps={TRAIN_INTERVAL}",
    "logger=csv",
    "+logger.csv.flush_logs_every_n_steps=1",
)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FASTSAMPLE_DATA", str(tmp_path / "data"))
    monkeypatch.delenv("FASTSAMPLE_DEBUG", raising=False)


# -- processes ------------------------------------------------------------------------------------------


def launch(args: list[str], log: Path, **popen: object) -> subprocess.Popen:
    """Start ``python *args`` in the repository (one thread, output to ``log``)."""
    env = {key: value for key, value in os.environ.items() if key != "FASTSAMPLE_DEBUG"}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    with open(log, "w") as handle:
        return subprocess.Popen(
            [sys.executable, *args], cwd=ROOT, env=env, stdout=handle, stderr=handle, **popen
        )


def wait_until(done: Callable[[], bool], process: subprocess.Popen, timeout: float = 600) -> bool:
    """Poll ``done`` until it holds (True) or the process exits first (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if done():
            return True
        if process.poll() is not None:
            return done()
        time.sleep(0.005)
    raise TimeoutError("no progress")


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL


def count_files(folder: Path, pattern: str = "*.npz") -> int:
    return len(list(folder.glob(pattern))) if folder.is_dir() else 0


def assert_no_partial_outputs(folder: Path) -> list[Path]:
    """Every file under its final name is complete (it loads); returns the temporaries (dot names).

    Hydra's own folder (.hydra) and log files are not fastsample outputs and are not checked.
    """
    temporaries = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or ".hydra" in path.parts:
            continue
        if path.name.startswith("."):
            temporaries.append(path)
        elif path.suffix == ".npz":
            with np.load(path) as data:
                [data[key] for key in data.files]
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".png":
            with Image.open(path) as image:
                image.verify()
        elif path.suffix in (".pt", ".ckpt"):
            torch.load(path, map_location="cpu", weights_only=False)
    return temporaries


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sample_config(out: Path, *overrides: str):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("sample", overrides=[*SAMPLE_ARGS, f"output_dir={out}", *overrides])


# -- sampling: kill, resume, compare bit for bit -----------------------------------------------------------


def kill_sampling_at_random(out: Path, rng: random.Random, last: int) -> int:
    """Start sample.py into ``out``, kill it once between 1 and ``last`` new shards; returns shards on disk.

    ``last`` at or beyond the shard count lets the kill land in the final merge too.
    """
    before = count_files(out / "shards")
    process = launch(["sample.py", *SAMPLE_ARGS, f"hydra.run.dir={out}"], out.with_suffix(".log"))
    target = min(before + rng.randint(1, last), SHARDS)
    reached = wait_until(lambda: count_files(out / "shards") >= target, process)
    if process.poll() is not None:  # finished first: only acceptable when aiming at the very end
        assert target == SHARDS and process.returncode == 0, out.with_suffix(".log").read_text()[-2000:]
        return count_files(out / "shards")
    assert reached
    time.sleep(rng.uniform(0.0, 0.05))  # anywhere in the next batch or its write
    kill(process)
    return count_files(out / "shards")


def test_killed_sampling_resumes_to_identical_output(tmp_path: Path) -> None:
    rng = random.Random(20240611)
    out = tmp_path / "killed"
    done = kill_sampling_at_random(out, rng, last=SHARDS // 2)
    assert 1 <= done < SHARDS
    assert all(path.suffix == ".tmp" for path in assert_no_partial_outputs(out))  # temporaries only
    assert not (out / "samples.npz").exists()
    state = json.loads((out / STATE_FILE).read_text())
    assert state["status"] == "running"
    assert set(state["finished"]) <= {path.name for path in (out / "shards").iterdir()}  # may lag, never lead

    summary = generate(sample_config(out))  # the same settings: only the missing seeds
    assert summary["generated_this_run"] == 6 * (SHARDS - done)
    assert assert_no_partial_outputs(out) == []  # the resumed run cleared the killed writer's temporaries
    reference = tmp_path / "reference"
    generate(sample_config(reference))
    assert digest(out / "samples.npz") == digest(reference / "samples.npz")
    for shard in (reference / "shards").iterdir():
        assert digest(out / "shards" / shard.name) == digest(shard)
    state = json.loads((out / STATE_FILE).read_text())
    assert state["status"] == "finished" and state["attempts"] == 2
    progress = {"parts_done": SHARDS, "parts_total": SHARDS, "items_done": 360, "items_total": 360}
    assert state["progress"] == progress


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4))
def test_repeatedly_killed_sampling_resumes_to_identical_output(tmp_path: Path, seed: int) -> None:
    """Kill, resume with the real command, kill again ... (also during the final merge), then finish."""
    rng = random.Random(seed)
    out = tmp_path / "killed"
    for _ in range(4):
        kill_sampling_at_random(out, rng, last=SHARDS)
        temporaries = assert_no_partial_outputs(out)
        assert all(path.suffix == ".tmp" for path in temporaries)
    finish = launch(["sample.py", *SAMPLE_ARGS, f"hydra.run.dir={out}"], tmp_path / "finish.log")
    assert finish.wait() == 0, (tmp_path / "finish.log").read_text()[-2000:]
    reference = tmp_path / "reference"
    generate(sample_config(reference))
    assert digest(out / "samples.npz") == digest(reference / "samples.npz")
    assert assert_no_partial_outputs(out) == []


# -- training: kill, resume from last.ckpt, the global step continues ---------------------------------------


def logged_steps(path: Path) -> list[int]:
    """The ``step`` column of a CSVLogger file (rows being written are skipped)."""
    if not path.is_file():
        return []
    steps = []
    with open(path) as handle:
        for row in csv.DictReader(handle):
            if (row.get("step") or "").isdigit():
                steps.append(int(row["step"]))
    return steps


def test_killed_training_resumes_and_loses_at_most_one_interval(tmp_path: Path) -> None:
    rng = random.Random(7)
    metrics = tmp_path / "csv" / "version_0" / "metrics.csv"
    last = tmp_path / "checkpoints" / "last.ckpt"
    process = launch(["train.py", *TRAIN_ARGS, f"hydra.run.dir={tmp_path}"], tmp_path / "train.log")
    target = rng.randint(TRAIN_INTERVAL + 2, TRAIN_STEPS - 20)
    reached = wait_until(lambda: last.exists() and max(logged_steps(metrics), default=-1) >= target, process)
    assert reached and process.poll() is None, (tmp_path / "train.log").read_text()[-3000:]
    kill(process)
    completed = max(logged_steps(metrics)) + 1  # steps the killed run is known to have finished
    saved = torch.load(last, weights_only=False)["global_step"]
    assert saved % TRAIN_INTERVAL == 0 and saved >= TRAIN_INTERVAL
    assert completed - saved <= TRAIN_INTERVAL  # at most one checkpoint interval is lost
    assert [p for p in assert_no_partial_outputs(tmp_path / "checkpoints") if p.suffix != ".tmp"] == []

    paths = [f"paths.output_dir={tmp_path}", f"paths.cache_dir={tmp_path}/cache"]
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[*TRAIN_ARGS, *paths, "ckpt_path=last"])
    train(cfg)
    resumed = logged_steps(tmp_path / "csv" / "version_1" / "metrics.csv")
    assert min(resumed) == saved and max(resumed) == TRAIN_STEPS - 1  # continues, no restart from 0
    assert torch.load(last, weights_only=False)["global_step"] == TRAIN_STEPS
    assert assert_no_partial_outputs(tmp_path / "checkpoints") == []


def test_checkpoint_io_leaves_no_partial_file(tmp_path: Path) -> None:
    path = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 4, "state_dict": {}}, path)

    def fail_halfway(obj: object, target: object) -> None:
        Path(target).write_bytes(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.EIO, "I/O error")

    with mock.patch("torch.save", side_effect=fail_halfway), pytest.raises(OSError):
        io.save_checkpoint({"global_step": 8, "state_dict": {}}, path)
    assert torch.load(path, weights_only=False)["global_step"] == 4  # the old one, intact
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]


# -- reference statistics and trajectories: interrupted, resumed, the same bits ---------------------------


class Interrupted(RuntimeError):
    pass


class Encoder(torch.nn.Module):
    """A small random encoder of 8x8 images: (16 features, 10 logits); counts (and may fail) its calls."""

    def __init__(self, calls: list[int] | None, fail_at: int | None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body, self.head = torch.nn.Linear(64, 16), torch.nn.Linear(16, 10)
        self.calls, self.fail_at = calls, fail_at

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.calls is not None:
            self.calls.append(len(x))
            if len(self.calls) == self.fail_at:
                raise Interrupted("killed")
        features = torch.tanh(self.body(x.flatten(1)))
        return features, self.head(features)


def tiny_features(calls: list[int] | None = None, fail_at: int | None = None) -> ModuleFeatures:
    return ModuleFeatures(Encoder(calls, fail_at))


def test_interrupted_reference_statistics_resume_to_identical_file(tmp_path: Path, digits) -> None:
    from fastsample.metrics.evaluator import Evaluator

    images = digits[0][:1000].float()
    with mock.patch("fastsample.metrics.resumable.PART_IMAGES", 200):
        calls: list[int] = []
        with pytest.raises(Interrupted):
            Evaluator(tiny_features(calls, fail_at=9), batch_size=64, keep_features=300).build_reference(
                images, path=tmp_path / "ref.npz"
            )
        parts = parts_dir_for(tmp_path / "ref.npz")
        assert sorted(p.name for p in parts.iterdir()) == ["part-00000.pt", "part-00001.pt"]  # 4 batches each
        assert not (tmp_path / "ref.npz").exists()
        calls.clear()
        resumed = Evaluator(tiny_features(calls), batch_size=64, keep_features=300)
        resumed.build_reference(images, path=tmp_path / "ref.npz")
        assert sum(calls) == 1000 - 2 * 4 * 64  # only the missing parts went through the extractor
        assert not parts.exists()
        uninterrupted = Evaluator(tiny_features(), batch_size=64, keep_features=300)
        uninterrupted.build_reference(images, path=tmp_path / "one.npz")
    assert digest(tmp_path / "ref.npz") == digest(tmp_path / "one.npz")
    with np.load(tmp_path / "ref.npz") as data:
        assert data["features"].shape == (300, 16)


def test_reference_parts_of_other_images_are_refused(tmp_path: Path, digits) -> None:
    from fastsample.metrics.evaluator import Evaluator

    images = digits[0][:600].float()
    with mock.patch("fastsample.metrics.resumable.PART_IMAGES", 200):
        with pytest.raises(Interrupted):
            Evaluator(tiny_features([], fail_at=6), batch_size=50).build_reference(
                images, path=tmp_path / "r"
            )
        with pytest.raises(UserError, match="part-00000.pt differ from those it was computed from"):
            Evaluator(tiny_features(), batch_size=50).build_reference(images.flip(0), path=tmp_path / "r")


TRAJECTORY_SCRIPT = """
import sys, torch
from omegaconf import OmegaConf
from hydra.utils import instantiate
from fastsample.data.trajectories import TrajectoryDataModule
from fastsample.diffusion import EDMDenoiser
from fastsample.samplers import Sampler

torch.set_num_threads(1)
torch.manual_seed(0)
net = instantiate(OmegaConf.to_container(OmegaConf.load("conf/net/unet_tiny.yaml")))
with torch.no_grad():
    for parameter in net.parameters():
        parameter.normal_(0.0, 0.2)
teacher = EDMDenoiser(net, image_shape=(1, 8, 8)).eval().requires_grad_(False)
data = TrajectoryDataModule(
    teacher, Sampler("ddim", 6, "karras"), M=4, count=int(sys.argv[2]), val_count=0, chunk_size=2,
    path=sys.argv[1], device="cpu", progress=False,
)
data.prepare_data()
data.setup("fit")
torch.save(data.dataset("train").tensors[0], sys.argv[1] + ".states.pt")
"""


@pytest.mark.slow
def test_killed_trajectory_generation_resumes_to_identical_data(tmp_path: Path) -> None:
    rng, count = random.Random(3), 80
    script = tmp_path / "trajectories.py"
    script.write_text(TRAJECTORY_SCRIPT)
    killed, fresh = tmp_path / "killed", tmp_path / "fresh"
    for _ in range(2):
        process = launch([str(script), str(killed), str(count)], tmp_path / "killed.log")
        target = count_files(killed / "chunks") + rng.randint(1, 10)
        assert wait_until(lambda target=target: count_files(killed / "chunks") >= target, process)
        time.sleep(rng.uniform(0.0, 0.05))
        kill(process)
        assert all(p.suffix == ".tmp" for p in assert_no_partial_outputs(killed))
    for folder in (killed, fresh):
        process = launch([str(script), str(folder), str(count)], tmp_path / f"{folder.name}.log")
        assert process.wait() == 0, (tmp_path / f"{folder.name}.log").read_text()[-2000:]
    assert torch.equal(torch.load(f"{killed}.states.pt"), torch.load(f"{fresh}.states.pt"))
    assert assert_no_partial_outputs(killed) == []


@pytest.mark.slow
@pytest.mark.skipif(not FMNIST_PRESENT, reason="Fashion-MNIST is not installed")
def test_killed_reference_statistics_resume_to_identical_file(tmp_path: Path) -> None:
    """evaluate.py mode=ref over the 10k Fashion-MNIST test images (two parts), killed after the first."""
    args = ["evaluate.py", "mode=ref", "dataset=fashion_mnist", "split=test", "device=cpu", "progress=false"]
    killed = tmp_path / "killed" / "ref.npz"
    process = launch([*args, f"ref={killed}", f"hydra.run.dir={tmp_path / 'run1'}"], tmp_path / "run1.log")
    assert wait_until(lambda: (parts_dir_for(killed) / "part-00000.pt").exists(), process)
    kill(process)
    for path, run in ((killed, "run2"), (tmp_path / "fresh" / "ref.npz", "run3")):
        process = launch([*args, f"ref={path}", f"hydra.run.dir={tmp_path / run}"], tmp_path / f"{run}.log")
        assert process.wait() == 0, (tmp_path / f"{run}.log").read_text()[-2000:]
    assert digest(killed) == digest(tmp_path / "fresh" / "ref.npz")


# -- run state: other settings are refused, not mixed -----------------------------------------------------


def test_run_state_refuses_other_settings_and_unknown_shards(tmp_path: Path) -> None:
    out = tmp_path / "out"
    generate(sample_config(out, "seeds=0-11"))
    shards = sorted((out / "shards").iterdir())
    before = {shard.name: digest(shard) for shard in shards}
    with pytest.raises(UserError, match=r"made with sampler.steps=40, but this run has sampler.steps=20"):
        generate(sample_config(out, "seeds=0-11", "sampler.steps=20"))
    with pytest.raises(UserError, match=r"made with seeds='0-11', but this run has seeds='0-23'"):
        generate(sample_config(out, "seeds=0-23"))
    assert {shard.name: digest(shard) for shard in shards} == before  # nothing was touched
    assert generate(sample_config(out, "seeds=0-11", "device=cpu", "grid_size=4"))["generated_this_run"] == 0
    (out / STATE_FILE).unlink()
    with pytest.raises(UserError, match=r"holds 2 finished parts .* but no run_state.json"):
        generate(sample_config(out, "seeds=0-11"))


# -- outputs: reproducible bytes, temporaries of dead writers, a full disk ---------------------------------


def test_npz_files_are_byte_reproducible(tmp_path: Path) -> None:
    arrays = {"images": np.arange(48, dtype=np.uint8).reshape(3, 4, 4, 1), "seeds": np.arange(3)}
    save_npz_atomic(tmp_path / "a.npz", **arrays)
    time.sleep(2.1)  # zip timestamps have a 2-second resolution
    save_npz_atomic(tmp_path / "b.npz", **arrays)
    assert digest(tmp_path / "a.npz") == digest(tmp_path / "b.npz")
    with np.load(tmp_path / "a.npz") as data:
        assert np.array_equal(data["images"], arrays["images"]) and data["seeds"].tolist() == [0, 1, 2]


def test_only_temporaries_of_dead_writers_on_this_host_are_removed(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = _host_tag()
    names = {
        "dead": f".seeds-0-9.npz.{host}-{dead.pid}.abc123.tmp",
        "alive": f".seeds-0-9.npz.{host}-{os.getpid()}.def456.tmp",
        "other_host": f".seeds-0-9.npz.{'0' * 8 if host != '0' * 8 else '1' * 8}-{dead.pid}.ghi789.tmp",
        "final": "seeds-0-9.npz",
    }
    for name in names.values():
        (tmp_path / name).write_bytes(b"x")
    assert remove_stale_temporaries(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(v for k, v in names.items() if k != "dead")


def test_full_disk_from_the_kernel_is_one_line_and_leaves_nothing_partial(tmp_path: Path) -> None:
    """A real write error: the file-size limit (RLIMIT_FSIZE) makes write() fail with EFBIG at 64 KiB,
    as a full disk makes it fail with ENOSPC; SIGXFSZ is ignored so the process sees the error."""

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    out = tmp_path / "out"
    args = [
        "sample.py",
        "model=gmm_toy",
        "sampler=euler",
        "sampler.steps=2",
        "seeds=0-9999",
        "batch_size=10000",
    ]
    process = launch([*args, f"hydra.run.dir={out}"], tmp_path / "log", preexec_fn=limit_file_size)
    assert process.wait() == 2
    errors = [line for line in (tmp_path / "log").read_text().splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: cannot write {out}/shards/seeds-00000000-00009999.npz: File too large (EFBIG); free space "
        "on that disk or write to another folder (output_dir=...); finished parts are kept, so rerunning "
        "the same command resumes"
    ]
    assert "Traceback" not in (tmp_path / "log").read_text()
    assert assert_no_partial_outputs(out) == []  # no temporaries either: the failed write cleaned up
    assert count_files(out / "shards") == 0


# -- numerical guards -----------------------------------------------------------------------------------


class Alternating:
    """A denoiser with finite but huge outputs of alternating sign: multistep extrapolation overflows."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.full_like(x, 3e38 * (-1) ** self.calls)


def test_non_finite_sampler_state_names_the_step_and_sigma() -> None:
    sigmas = torch.tensor([10.0, 4.0, 1.0, 0.2, 0.0])
    with pytest.raises(NumericalError, match=r"sampler state became non-finite at step 1 \(sigma 4 -> 1\)"):
        Sampler("dpmpp_2m", 4).sample(Alternating(), torch.zeros(4, 2), sigmas=sigmas)


def test_model_returning_nan_is_reported_with_its_call_and_sigma() -> None:
    sigmas = torch.tensor([10.0, 1.0, 0.0])
    with pytest.raises(NumericalError, match=r"the model returned non-finite values at call 1 \(sigma=10\)"):
        Sampler("euler", 2).sample(lambda x, s: x * np.nan, torch.ones(2, 2), sigmas=sigmas)


SAMPLERS_ENDING_AT_ZERO = [
    "euler",
    "ddim",
    "heun",
    "edm_sde",
    "dpmpp_2m",
    "dpmpp_3m",
    "dpmpp_2m_sde",
    "unipc",
    "ddpm",
    "euler_ancestral",
    "restart",
]
#: fixed-coefficient Adams-Bashforth on slopes: the last step extrapolates, as in k-diffusion / PNDM
SLOPE_MULTISTEP = ["lms", "plms", "ipndm"]


@pytest.mark.parametrize("name", SAMPLERS_ENDING_AT_ZERO + SLOPE_MULTISTEP)
def test_final_step_to_sigma_zero_is_exact(name: str) -> None:
    """No model call at sigma = 0; the data-prediction solvers return the last denoised estimate bit
    for bit (``x + (0 - s)(x - D)/s`` differs from ``D`` by an ulp in ~15% of the entries here)."""
    model = GaussianMixture.toy("two_blobs", sigma_min=0.02, sigma_max=80.0)
    called: list[float] = []

    def denoiser(x: torch.Tensor, sigma: torch.Tensor, **cond: object) -> torch.Tensor:
        called.append(float(sigma.reshape(-1)[0]))
        return model(x, sigma).float() + 1e-3 * torch.sin(37 * x)  # values with full mantissas

    # a last step from sigma 0.7, where x - D is large enough for the rounding to show
    sampler, seen, noise = Sampler(name, 4), [], SeedNoise(range(512))
    grid = torch.tensor([80.0, 10.0, 2.5, 0.7, 0.0], dtype=torch.float64)
    out = sampler.sample(denoiser, noise.randn((2,)), generator=noise, callback=seen.append, sigmas=grid)
    assert grid[-1] == 0.0 and 0.0 not in called
    assert bool(torch.isfinite(out).all())
    if name in SAMPLERS_ENDING_AT_ZERO:
        assert torch.equal(out, seen[-1]["denoised"])


def test_extreme_guidance_scale_warns_and_overflow_is_an_error(tmp_path: Path) -> None:
    with pytest.warns(ExtremeGuidanceWarning, match="guidance.scale=1000 is far above the usual range 0-30"):
        MixturePosteriorGuidance(scale=1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MixturePosteriorGuidance(scale=20)
        warn_extreme_scale("guidance.scale", 30.0)
    cfg = sample_config(tmp_path / "out", "guidance=gmm_posterior", "guidance.scale=1e12", "seeds=0-7")
    with pytest.warns(ExtremeGuidanceWarning), pytest.raises(NumericalError, match="lower guidance.scale"):
        generate(cfg)
    assert not (tmp_path / "out" / "samples.npz").exists()


def test_bfloat16_network_keeps_a_float32_solver_state(tiny_net_denoiser) -> None:
    """network_precision=bfloat16: the network runs in bfloat16, every solver state stays float32."""
    from fastsample.diffusion.accel import NetworkWrapper

    states: list[torch.dtype] = []
    noise = SeedNoise(range(4)).randn((1, 8, 8))
    with torch.no_grad():
        full = Sampler("dpmpp_2m", 6).sample(tiny_net_denoiser, noise)
        mixed = Sampler("dpmpp_2m", 6).sample(
            NetworkWrapper(tiny_net_denoiser, torch.bfloat16, channels_last=False),
            noise,
            callback=lambda info: states.append(info["x"].dtype),
        )
    assert mixed.dtype == torch.float32 and set(states) == {torch.float32}
    assert bool(torch.isfinite(mixed).all()) and not torch.equal(mixed, full)  # bfloat16 did run
    assert float((mixed - full).abs().max()) < 0.1 * float(full.abs().max())
