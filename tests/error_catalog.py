"""The bad-input catalog: every case, how to run it, the message the user sees and the exit code.

This list is the single source of truth of ``docs/errors.md``: ``tests/test_errors.py`` runs every case
and checks that the message matches the case's pattern *and* equals the documented one, and that the
document lists exactly these cases. After changing a message or a case, regenerate the document:

    .venv/bin/python tests/error_catalog.py          # runs every case, rewrites docs/errors.md

Cases run in-process through the entry point's own path (Hydra compose + ``run_cli``), which prints
the same line and exits with the same code as the command; a case marked ``process=True`` runs the real
command, for what only the command shows (Hydra's composition errors, ``FASTSAMPLE_DEBUG``).
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "errors.md"
CONFIGS = {"sample.py": "sample", "train.py": "train", "evaluate.py": "evaluate"}
# Training cases: sklearn's 8x8 digits and the tiny UNet (as in tests/test_training.py).
TINY_TRAIN = (
    "dataset=digits",
    "dataset.subset=64",
    "dataset.batch_size=32",
    "task=diffusion",
    "net@task.net=unet_tiny",
    "callbacks.sample_grid=null",
    "trainer=debug",
)
EVAL_SCORE = ("mode=score", "features=classifier", "device=cpu", "progress=false")


@dataclass(frozen=True)
class Case:
    """One bad input: ``script`` with ``args`` (``{tmp}`` is a fresh folder prepared by ``setup``).

    ``message`` is a pattern the printed message must match (searched); ``patch`` makes a fault that
    the command line cannot (a full disk, no network); ``process`` runs the real command in a
    subprocess; ``pythonpath`` puts ``{tmp}`` on the import path (``PYTHONPATH={tmp}`` in the command).
    """

    name: str
    input: str
    script: str
    args: tuple[str, ...]
    message: str
    exit_code: int
    setup: Callable[[Path], None] | None = None
    patch: Callable[[], contextlib.AbstractContextManager] | None = None
    process: bool = False
    env: dict[str, str] = field(default_factory=dict)
    pythonpath: bool = False  # {tmp} is importable (the user's own modules, model=callable)

    def command(self) -> str:
        """The command line as documented."""
        prefix = ["PYTHONPATH={tmp}"] if self.pythonpath else []
        return " ".join([*prefix, "python", self.script, *self.args])


@dataclass(frozen=True)
class Outcome:
    """What the user saw: the message (normalized, one line) and the exit code."""

    message: str
    exit_code: int


# -- setups: files the cases point at -------------------------------------------------------------------


def _tiny_module(task: str = "diffusion") -> torch.nn.Module:
    from omegaconf import OmegaConf

    if task == "classifier":
        from fastsample.lit.classifier import ClassifierModule

        return ClassifierModule(OmegaConf.load(ROOT / "conf/net/classifier_tiny.yaml"))
    from fastsample.lit.diffusion import DiffusionModule

    torch.manual_seed(0)
    return DiffusionModule(OmegaConf.load(ROOT / "conf/net/unet_tiny.yaml"))


def make_bundles(tmp: Path) -> None:
    """A diffusion bundle, half of it (truncated), bare weights (foreign) and a half Lightning checkpoint."""
    module = _tiny_module()
    data = module.export(tmp / "model.pt").read_bytes()
    (tmp / "truncated.pt").write_bytes(data[: len(data) // 2])
    torch.save(module.net.state_dict(), tmp / "weights.pt")
    checkpoint = io.BytesIO()
    torch.save({"state_dict": module.state_dict(), "global_step": 4}, checkpoint)
    (tmp / "truncated.ckpt").write_bytes(checkpoint.getvalue()[: len(checkpoint.getvalue()) // 2])


def make_empty_folder(tmp: Path) -> None:
    (tmp / "empty").mkdir()


def make_previous_run(tmp: Path) -> None:
    """A finished sample.py run (sampler.steps=3) in <tmp>/out."""
    from fastsample.jobs.sampling import generate

    with contextlib.redirect_stderr(io.StringIO()):
        generate(compose("sample", ("model=gmm_toy", "seeds=0-7", "sampler.steps=3"), tmp))


def make_eval_files(tmp: Path) -> None:
    """For evaluate.py: a reference of the shipped classifier, one of Inception, a reference without
    mu / sigma, samples without images and samples of the wrong shape."""
    from fastsample.lit.loading import classifier_features
    from fastsample.metrics.reference import ReferenceStats
    from fastsample.utils.io import save_npz_atomic

    extractor = classifier_features()
    with torch.no_grad():
        dim = extractor(torch.zeros(1, 1, 28, 28))["features"].shape[1]
    mu, sigma = np.zeros(dim), np.eye(dim)
    ours = ReferenceStats(mu, sigma, extractor=extractor.name, weights_hash=extractor.weights_hash)
    meta = {key: np.array(value) for key, value in ours.metadata().items() if value is not None}
    save_npz_atomic(tmp / "ref.npz", mu=mu, sigma=sigma, **meta)
    save_npz_atomic(
        tmp / "inception_ref.npz",
        mu=np.zeros(2048),
        sigma=np.eye(2048),
        extractor=np.array("inception-v3-clean"),
    )
    save_npz_atomic(tmp / "no_mu.npz", features=np.zeros((4, dim)))
    save_npz_atomic(tmp / "no_images.npz", samples=np.zeros((4, 28, 28, 1), np.uint8))
    save_npz_atomic(tmp / "rgb.npz", images=np.zeros((4, 28, 28, 3), np.uint8))
    save_npz_atomic(tmp / "small.npz", images=np.zeros((4, 8, 8, 1), np.uint8))


USER_MODELS = """
import torch
from fastsample.models.gmm import GaussianMixture


class Exact:
    \"\"\"An exact-score mixture as a class: the model is an instance.\"\"\"

    def __init__(self, name: str = "ring") -> None:
        self.mixture = GaussianMixture.toy(name)

    def __call__(self, x, sigma, **cond):
        return self.mixture(x, sigma)


def denoise(x, sigma, **cond):
    return x / (1 + sigma[:, None] ** 2)


def wrong_shape(x, sigma, **cond):
    return x[:, :1]
"""


def make_user_models(tmp: Path) -> None:
    """``<tmp>/user_models.py``: a user's own models for ``model=callable`` (on PYTHONPATH)."""
    (tmp / "user_models.py").write_text(USER_MODELS)


def make_mask(tmp: Path) -> None:
    """A 5x5 inpainting mask, for 28x28 images."""
    np.save(tmp / "mask.npy", np.ones((5, 5), np.float32))


def make_five_samples(tmp: Path) -> None:
    """The evaluation files and ``five.npz``: 5 images of the classifier's shape."""
    make_eval_files(tmp)
    from fastsample.utils.io import save_npz_atomic

    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28, 1), dtype=np.uint8)
    save_npz_atomic(tmp / "five.npz", images=images)


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """No network: every URL fails to resolve (what dataset.download=true meets on an offline machine)."""
    import urllib.error

    failure = urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    with mock.patch("urllib.request.urlopen", side_effect=failure):
        yield


@contextlib.contextmanager
def disk_full() -> Iterator[None]:
    """The disk fills up after the first file (the run state): from then on fsync reports ENOSPC, as it
    does on file systems with delayed allocation."""
    calls = []
    fsync = os.fsync

    def full_after_one(fd: int) -> None:
        calls.append(fd)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fsync(fd)

    with mock.patch("os.fsync", side_effect=full_after_one):
        yield


# -- the catalog ------------------------------------------------------------------------------------------

CASES: tuple[Case, ...] = (
    Case(
        "unknown-option",
        "an unknown config option",
        "sample.py",
        ("model=gmm_toy", "sampler.stpes=5"),
        r"Could not override 'sampler.stpes'.*Key 'stpes' is not in struct",
        1,
        process=True,
    ),
    Case(
        "unknown-choice-group",
        "an unknown config group option",
        "sample.py",
        ("model=gmm_toy", "sampler=dpm9"),
        r"Could not find 'sampler/dpm9'.*Available options in 'sampler':.*dpmpp_2m",
        1,
        process=True,
    ),
    Case(
        "unknown-sampler-setting",
        "a setting the sampler does not have",
        "sample.py",
        ("model=gmm_toy", "+sampler.eta=0.5"),
        r"sampler\.eta is not a setting of sampler 'dpmpp_2m'; allowed: \w+",
        2,
    ),
    Case(
        "invalid-steps",
        "an invalid numeric setting",
        "sample.py",
        ("model=gmm_toy", "sampler.steps=0"),
        r"sampler\.steps=0 is out of range; allowed: \[1, inf\]",
        2,
    ),
    Case(
        "invalid-batch-size",
        "an invalid batch size",
        "sample.py",
        ("model=gmm_toy", "batch_size=0"),
        r"batch_size=0 is not allowed; use a positive integer",
        2,
    ),
    Case(
        "invalid-choice",
        "a value outside the allowed choices",
        "sample.py",
        ("model=gmm_toy", "sampler.schedule.kind=cubic"),
        r"sampler\.schedule\.kind='cubic'.*karras",
        2,
    ),
    Case(
        "empty-seeds",
        "no seeds",
        "sample.py",
        ("model=gmm_toy", "seeds=[]"),
        r"seeds is empty; give e\.g\. seeds=0-63",
        2,
    ),
    Case(
        "required-setting",
        "a required setting left unset",
        "sample.py",
        ("model=from_checkpoint",),
        r"model\.path is required and has no value \(\?\?\?\); set it",
        2,
    ),
    Case(
        "missing-checkpoint",
        "a missing checkpoint",
        "sample.py",
        ("model=from_checkpoint", "model.path={tmp}/missing.pt"),
        r"model\.path='.*missing\.pt'.* does not exist",
        2,
    ),
    Case(
        "truncated-checkpoint",
        "a truncated checkpoint",
        "sample.py",
        ("model=from_checkpoint", "model.path={tmp}/truncated.pt", "device=cpu"),
        r"model\.path='.*truncated\.pt' is not a readable checkpoint",
        2,
        setup=make_bundles,
    ),
    Case(
        "foreign-checkpoint",
        "a checkpoint that is not a fastsample model (bare weights)",
        "sample.py",
        ("model=from_checkpoint", "model.path={tmp}/weights.pt", "device=cpu"),
        r"model\.path='.*weights\.pt' is not a fastsample bundle",
        2,
        setup=make_bundles,
    ),
    Case(
        "wrong-shape",
        "a data shape the model does not make",
        "sample.py",
        ("model=gmm_toy", "shape=[3,8,8]"),
        r"shape=\[3, 8, 8\] does not match the model's data shape \[2\]",
        2,
    ),
    Case(
        "class-label-range",
        "a class label the model does not have",
        "sample.py",
        ("model=gmm_toy", "class_labels=12"),
        r"class_labels=12 is not allowed; choose null, cycle or a class in \[0, 7\]",
        2,
    ),
    Case(
        "model-nan",
        "a model that returns NaN",
        "sample.py",
        ("model=gmm_toy", "model.std=nan"),
        r"the model returned non-finite values at call 1 \(sigma=80\)",
        3,
    ),
    Case(
        "extreme-guidance",
        "an extreme guidance scale (a warning; the run completes)",
        "sample.py",
        ("model=gmm_toy", "guidance=gmm_posterior", "guidance.scale=1000", "seeds=0-7"),
        r"ExtremeGuidanceWarning: guidance\.scale=1000 is far above the usual range 0-30",
        0,
    ),
    Case(
        "resume-other-settings",
        "resuming into an output folder made with other settings",
        "sample.py",
        ("model=gmm_toy", "seeds=0-7", "sampler.steps=4", "output_dir={tmp}/out"),
        r"output_dir='.*out' holds a sample run made with sampler\.steps=3, but this run has "
        r"sampler\.steps=4",
        2,
        setup=make_previous_run,
    ),
    Case(
        "disk-full",
        "a full disk while writing outputs (simulated: fsync reports ENOSPC after the first file)",
        "sample.py",
        ("model=gmm_toy", "seeds=0-7"),
        r"cannot write .*/shards/seeds-00000000-00000007\.npz: No space left on device \(ENOSPC\)",
        2,
        patch=disk_full,
    ),
    Case(
        "debug-traceback",
        "any user error with FASTSAMPLE_DEBUG=1 (the traceback is shown)",
        "sample.py",
        ("model=gmm_toy", "sampler.steps=0"),
        r"Traceback \(most recent call last\).*UserError: sampler\.steps=0 is out of range",
        1,
        process=True,
        env={"FASTSAMPLE_DEBUG": "1"},
    ),
    Case(
        "wrong-type",
        "a value of the wrong type (checked against the typed settings before anything runs)",
        "sample.py",
        ("model=gmm_toy", "sampler.steps=ten"),
        r"sampler\.steps='ten' is not an integer; e\.g\. sampler\.steps=10",
        2,
    ),
    Case(
        "fractional-steps",
        "a fraction where a count is expected",
        "sample.py",
        ("model=gmm_toy", "sampler.steps=2.5"),
        r"sampler\.steps=2\.5 is not an integer",
        2,
    ),
    Case(
        "wrong-type-batch-size",
        "a batch size that is not a number",
        "sample.py",
        ("model=gmm_toy", "batch_size=abc"),
        r"batch_size='abc' is not an integer; e\.g\. batch_size=128",
        2,
    ),
    Case(
        "fractional-batch-size",
        "a fractional batch size",
        "sample.py",
        ("model=gmm_toy", "batch_size=2.5"),
        r"batch_size=2\.5 is not an integer",
        2,
    ),
    Case(
        "wrong-type-schedule",
        "a schedule setting of the wrong type",
        "sample.py",
        ("model=gmm_toy", "sampler.schedule.rho=abc"),
        r"sampler\.schedule\.rho='abc' is not a number; e\.g\. sampler\.schedule\.rho=7\.0",
        2,
    ),
    Case(
        "invalid-seeds",
        "seeds that are not a seed list",
        "sample.py",
        ("model=gmm_toy", "seeds=abc"),
        r"seeds='abc' is not a seed list; give a range \(seeds=0-99\)",
        2,
    ),
    Case(
        "negative-seeds",
        "a negative seed count",
        "sample.py",
        ("model=gmm_toy", "seeds=-5"),
        r"seeds=-5 is not allowed: a count must be >= 0",
        2,
    ),
    Case(
        "unknown-device",
        "a device that does not exist",
        "sample.py",
        ("model=gmm_toy", "device=tpu"),
        r"device='tpu' is not allowed; choose auto, cpu, cuda, cuda:N or mps",
        2,
    ),
    Case(
        "unknown-model-setting",
        "a setting the model does not take, added with +",
        "sample.py",
        ("model=gmm_toy", "+model.model_channels=32"),
        r"model\.model_channels is not a setting of model \(fastsample\.models\.gmm\.GaussianMixture\.toy\)",
        2,
    ),
    Case(
        "unknown-top-level-setting",
        "a top-level setting no entry point has, added with +",
        "sample.py",
        ("model=gmm_toy", "+stpes=5"),
        r"stpes is not a setting of sample\.py \(conf/sample\.yaml\)",
        2,
        process=True,
    ),
    Case(
        "sigma-range",
        "a schedule sigma_min above sigma_max (refused before anything is written)",
        "sample.py",
        ("model=gmm_toy", "sampler.schedule.sigma_min=90"),
        r"sampler\.schedule\.sigma_min=90 must be below sigma_max=80\.0",
        2,
    ),
    Case(
        "schedule-path-without-file",
        "a schedule file given without schedule kind file",
        "sample.py",
        ("model=gmm_toy", "sampler.schedule.path={tmp}/schedule.yaml"),
        r"sampler\.schedule\.path=.* is set but sampler\.schedule\.kind=karras; "
        r"add sampler\.schedule\.kind=file",
        2,
    ),
    Case(
        "restart-t-max",
        "a Restart interval above the schedule's start (refused before anything is written)",
        "sample.py",
        ("model=gmm_toy", "sampler=restart", "sampler.restart_list=[[0.1,100,2,3]]"),
        r"sampler\.restart_list\[0\]\.t_max=100\.0 is above the schedule's start sigma 80",
        2,
    ),
    Case(
        "es-ddpm-t-prime",
        "an ES-DDPM start step beyond the model's T (refused before anything is written)",
        "sample.py",
        ("model=unet_fmnist", "sampler=es_ddpm", "sampler.t_prime=2000", "device=cpu"),
        r"sampler\.t_prime=2000 is out of range; allowed: an integer step in \(0, 1000\]",
        2,
    ),
    Case(
        "es-ddpm-prior-shape",
        "an ES-DDPM prior of another image shape than the bundle's (refused before anything is written)",
        "sample.py",
        ("model=from_checkpoint", "model.path={tmp}/model.pt", "sampler=es_ddpm", "device=cpu"),
        r"sampler\.prior \(vae\) makes images of shape \(1, 28, 28\) but the model's data shape "
        r"is \(1, 8, 8\)",
        2,
        setup=make_bundles,
    ),
    Case(
        "inpaint-mask-shape",
        "an inpainting mask of the wrong shape (refused before anything is written)",
        "sample.py",
        ("model=unet_fmnist", "guidance=inpaint", "guidance.mask={tmp}/mask.npy", "device=cpu"),
        r"guidance\.mask has shape \(5, 5\) but the data is \(1, 28, 28\)",
        2,
        setup=make_mask,
    ),
    Case(
        "callable-unimportable",
        "model=callable with a module that cannot be imported",
        "sample.py",
        ("model=callable", "model.fn=no_such_module.Model", "model.image_shape=[2]"),
        r"model\.fn='no_such_module\.Model' cannot be imported: ModuleNotFoundError: No module named "
        r"'no_such_module'; the module must be importable: install it, or add its folder to PYTHONPATH",
        2,
    ),
    Case(
        "callable-class-without-kwargs",
        "model=callable naming a class without model.kwargs",
        "sample.py",
        ("model=callable", "model.fn=user_models.Exact", "model.image_shape=[2]"),
        r"model\.fn=user_models\.Exact is a class: give model\.kwargs .*model\.kwargs=\{\}",
        2,
        setup=make_user_models,
        pythonpath=True,
    ),
    Case(
        "callable-without-shape",
        "model=callable without the data shape",
        "sample.py",
        ("model=callable", "model.fn=user_models.denoise"),
        r"the model does not declare its data shape; set model\.image_shape=\[C,H,W\]",
        2,
        setup=make_user_models,
        pythonpath=True,
    ),
    Case(
        "callable-wrong-shape",
        "model=callable returning another shape than its input",
        "sample.py",
        ("model=callable", "model.fn=user_models.wrong_shape", "model.image_shape=[2]", "seeds=0-7"),
        r"model\.fn=user_models\.wrong_shape returned \[8, 1\] for an input of shape \[8, 2\]",
        2,
        setup=make_user_models,
        pythonpath=True,
    ),
    Case(
        "search-worse-than-configured",
        "a searched schedule that loses to the configured one on held-out seeds (a warning; not the result)",
        "sample.py",
        (
            "mode=optimize_schedule",
            "model=gmm_toy",
            "sampler=ipndm",
            "schedule_search.nfe=20",
            "schedule_search.gits.refine_sweeps=0",
            "schedule_search.seeds=100000-100031",
            "schedule_search.holdout_seeds=200000-200031",
            "schedule_search.candidates=40",
            "schedule_search.progress=false",
        ),
        r"warning: the gits schedule for ipndm at NFE 20 is worse than the configured karras schedule on "
        r"the held-out seeds .*it is not the result \(kept for inspection as "
        r"schedule-ipndm-nfe20-gits\.rejected\.yaml\)",
        0,
    ),
    Case(
        "train-unknown-dataset",
        "an unknown data set",
        "train.py",
        (*TINY_TRAIN, "dataset.name=imagenet"),
        r"dataset\.name='imagenet' is not allowed; choose one of: .*digits",
        2,
    ),
    Case(
        "train-missing-dataset",
        "a missing data set",
        "train.py",
        (*TINY_TRAIN, "dataset=mnist", "dataset.root={tmp}/nowhere", "task.net.image_size=28"),
        r"mnist train files .* not found; looked in: <tmp>/nowhere, .*Provide them with dataset\.root=DIR",
        2,
    ),
    Case(
        "train-empty-dataset",
        "an empty image folder",
        "train.py",
        (
            *TINY_TRAIN,
            "dataset=image_folder",
            "dataset.root={tmp}/empty",
            "dataset.resolution=8",
            "dataset.channels=1",
        ),
        r"no images .* found under .*empty; set dataset\.root to a folder that contains image files",
        2,
        setup=make_empty_folder,
    ),
    Case(
        "train-image-shape",
        "a network whose image size differs from the data",
        "train.py",
        (*TINY_TRAIN, "task.net.image_size=16"),
        r"the network expects images of shape \(1, 16, 16\) but dataset 'digits' gives \(1, 8, 8\)",
        2,
    ),
    Case(
        "train-invalid-lr",
        "an invalid learning rate",
        "train.py",
        (*TINY_TRAIN, "task.lr=-0.001"),
        r"task\.lr=-0\.001 is out of range; allowed: \(0, inf\]",
        2,
    ),
    Case(
        "train-truncated-ckpt",
        "resuming from a truncated training checkpoint",
        "train.py",
        (*TINY_TRAIN, "ckpt_path={tmp}/truncated.ckpt"),
        r"ckpt_path='.*truncated\.ckpt' is not a readable checkpoint",
        2,
        setup=make_bundles,
    ),
    Case(
        "train-foreign-ckpt",
        "resuming from a file that is not a training checkpoint",
        "train.py",
        (*TINY_TRAIN, "ckpt_path={tmp}/model.pt"),
        r"ckpt_path='.*model\.pt' is not a Lightning training checkpoint",
        2,
        setup=make_bundles,
    ),
    Case(
        "train-wrong-type",
        "a training setting of the wrong type",
        "train.py",
        (*TINY_TRAIN, "trainer.max_steps=ten"),
        r"trainer\.max_steps='ten' is not an integer; e\.g\. trainer\.max_steps=10000",
        2,
    ),
    Case(
        "train-download-offline",
        "dataset.download=true without a network",
        "train.py",
        (
            *TINY_TRAIN,
            "dataset=mnist",
            "dataset.download=true",
            "dataset.root={tmp}/mnist",
            "task.net.image_size=28",
        ),
        r"dataset\.download=true could not download mnist \(.*Temporary failure in name resolution.*\); is "
        r"this machine offline\? Put the files in a folder and set dataset\.root=DIR dataset\.download=false",
        2,
        patch=offline,
    ),
    Case(
        "eval-missing-samples",
        "samples that do not exist",
        "evaluate.py",
        (*EVAL_SCORE, "samples={tmp}/none.npz", "ref={tmp}/ref.npz"),
        r"samples='.*none\.npz' does not exist",
        2,
        setup=make_eval_files,
    ),
    Case(
        "eval-npz-without-images",
        "an .npz without the images array",
        "evaluate.py",
        (*EVAL_SCORE, "samples={tmp}/no_images.npz", "ref={tmp}/ref.npz"),
        r"samples='.*no_images\.npz' lacks an 'images' array \(has: samples\)",
        2,
        setup=make_eval_files,
    ),
    Case(
        "eval-wrong-channels",
        "images with the wrong number of channels",
        "evaluate.py",
        (*EVAL_SCORE, "samples={tmp}/rgb.npz", "ref={tmp}/ref.npz"),
        r"images are 3x28x28 \(C x H x W\) but the feature extractor 'classifier:\w+' expects 1x28x28",
        2,
        setup=make_eval_files,
    ),
    Case(
        "eval-wrong-shape",
        "images of the wrong size",
        "evaluate.py",
        (*EVAL_SCORE, "samples={tmp}/small.npz", "ref={tmp}/ref.npz"),
        r"images are 1x8x8 \(C x H x W\) but the feature extractor 'classifier:\w+' expects 1x28x28",
        2,
        setup=make_eval_files,
    ),
    Case(
        "eval-empty-folder",
        "an empty folder of samples",
        "evaluate.py",
        (*EVAL_SCORE, "samples={tmp}/empty", "ref={tmp}/ref.npz"),
        r"samples='.*empty' holds no image files",
        2,
        setup=lambda tmp: (make_eval_files(tmp), make_empty_folder(tmp)),
    ),
    Case(
        "eval-reference-without-keys",
        "reference statistics without mu / sigma",
        "evaluate.py",
        (*EVAL_SCORE, "samples={tmp}/small.npz", "ref={tmp}/no_mu.npz"),
        r"reference statistics file '.*no_mu\.npz' lacks mu, sigma \(has: features\)",
        2,
        setup=make_eval_files,
    ),
    Case(
        "eval-reference-other-extractor",
        "reference statistics from another feature extractor",
        "evaluate.py",
        (*EVAL_SCORE, "samples={tmp}/small.npz", "ref={tmp}/inception_ref.npz"),
        r"were made with extractor 'inception-v3-clean', not 'classifier:\w+'; recompute them",
        2,
        setup=make_eval_files,
    ),
    Case(
        "eval-wrong-type",
        "an evaluation setting of the wrong type",
        "evaluate.py",
        (*EVAL_SCORE, "samples={tmp}/five.npz", "ref={tmp}/ref.npz", "evaluator.kid_subsets=many"),
        r"evaluator\.kid_subsets='many' is not an integer; e\.g\. evaluator\.kid_subsets=100",
        2,
        setup=make_five_samples,
    ),
    Case(
        "eval-too-few-samples",
        "scores of fewer samples than each score's minimum (warnings per score; the run completes)",
        "evaluate.py",
        (*EVAL_SCORE, "samples={tmp}/five.npz", "ref={tmp}/ref.npz"),
        r"SampleCountWarning: FID from 5 samples is unreliable: it needs at least \d+ .*"
        r"SampleCountWarning: IS from 5 samples is unreliable: it needs at least 100 \(is_splits 10 x 10 "
        r"classes\); splits of 1 sample cap IS at 1",
        0,
        setup=make_five_samples,
    ),
)


# -- running a case ----------------------------------------------------------------------------------------


def compose(config: str, args: tuple[str, ...], tmp: Path):
    """The entry point's config for ``args``, writing under ``<tmp>/out`` (what hydra.run.dir would do)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    overrides = [f"paths.output_dir={tmp}/out", f"paths.cache_dir={tmp}/cache"]
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config, overrides=[*overrides, *args])


def _entry_point(script: str) -> Callable:
    """What ``script`` runs for a composed config: its entry point (typed settings, then ``run_cli``)."""
    if script == "sample.py":
        from fastsample.jobs.cli import sample_main

        return sample_main
    if script == "train.py":
        from fastsample.jobs.cli import train_main

        return train_main
    from fastsample.jobs.cli import evaluate_main

    return evaluate_main


def run_case(case: Case, tmp: Path) -> Outcome:
    """Run ``case`` in the fresh folder ``tmp``; returns what the user saw."""
    tmp.mkdir(parents=True, exist_ok=True)
    if case.setup is not None:
        case.setup(tmp)
    args = tuple(arg.format(tmp=tmp) for arg in case.args)
    env = {"FASTSAMPLE_DATA": str(tmp / "data"), **case.env}  # data lookups name no outside folder
    run = _run_process if case.process else _run_in_process
    stderr, code = run(case, args, tmp, env)
    return Outcome(shown_message(stderr, case.exit_code, tmp), code)


def _run_in_process(case: Case, args: tuple[str, ...], tmp: Path, env: dict[str, str]) -> tuple[str, int]:
    captured, code = io.StringIO(), 0
    patch = case.patch() if case.patch is not None else contextlib.nullcontext()
    environment = mock.patch.dict(os.environ, env)
    path = importable(tmp) if case.pythonpath else contextlib.nullcontext()
    with (
        warnings.catch_warnings(record=True) as caught,
        contextlib.redirect_stderr(captured),
        patch,
        environment,
        path,
    ):
        warnings.simplefilter("always")
        try:
            _entry_point(case.script)(compose(CONFIGS[case.script], args, tmp))
        except SystemExit as exit_:
            code = int(exit_.code or 0)
    shown = [f"{w.category.__name__}: {w.message}" for w in caught if issubclass(w.category, UserWarning)]
    return "\n".join([*shown, captured.getvalue()]), code


@contextlib.contextmanager
def importable(folder: Path) -> Iterator[None]:
    """``folder`` on the import path (as ``PYTHONPATH=folder``); its modules are forgotten afterwards."""
    sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        sys.path.remove(str(folder))
        for name in [name for name, module in sys.modules.items() if _inside(module, folder)]:
            del sys.modules[name]


def _inside(module: object, folder: Path) -> bool:
    return str(getattr(module, "__file__", "") or "").startswith(str(folder))


def _run_process(case: Case, args: tuple[str, ...], tmp: Path, env: dict[str, str]) -> tuple[str, int]:
    environment = {key: value for key, value in os.environ.items() if key != "FASTSAMPLE_DEBUG"}
    environment.update({"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **env})
    if case.pythonpath:
        environment["PYTHONPATH"] = str(tmp)
    result = subprocess.run(
        [sys.executable, case.script, *args, f"hydra.run.dir={tmp}/run"],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return result.stderr, result.returncode


def shown_message(stderr: str, exit_code: int, tmp: Path) -> str:
    """The lines a user reads in ``stderr``, joined into one: the ``error:`` line of a user error, a
    warning's line, or (Hydra's errors, tracebacks) the message lines; paths normalized."""
    lines = [line.strip() for line in stderr.replace("\r", "\n").splitlines()]
    lines = [line for line in lines if line and not _noise(line)]
    if "Config search path:" in lines:  # Hydra's list of installation folders ends its message
        lines = lines[: lines.index("Config search path:")]
    errors = [line for line in lines if line.startswith("error: ")]
    if errors:
        lines = errors
    elif exit_code == 0:
        lines = [line for line in lines if "Warning: " in line or line.startswith("warning: ")]
    elif any(line.startswith("Traceback") for line in lines):
        start = next(i for i, line in enumerate(lines) if line.startswith("Traceback"))
        lines = [*lines[: start + 1], lines[-1]]  # the frames in between depend on the installation
    return " / ".join(lines).replace(str(tmp), "<tmp>").replace(str(ROOT), "<repo>")


NOISE = ("Set the environment variable HYDRA_FULL", "[", "GPU available", "TPU available", "Running in", "💡")


def matches(case: Case, outcome: Outcome) -> bool:
    """Whether ``outcome`` is what ``case`` expects (its pattern and exit code)."""
    return bool(re.search(case.message, outcome.message)) and outcome.exit_code == case.exit_code


def _noise(line: str) -> bool:
    """Progress bars, log lines, Lightning's banners and Hydra's hint, which are not the message."""
    return bool(re.search(r"\d+%\|", line)) or line.startswith(NOISE)


# -- the document --------------------------------------------------------------------------------------------

HEADER = """# Bad-input catalog

Every row is a test: `tests/test_errors.py` runs the command (in `tests/error_catalog.py`, with the
files `{tmp}` stands for) and checks that the message the user sees and the exit code are exactly
the ones below. Regenerate after changing a message: `.venv/bin/python tests/error_catalog.py`.

Exit codes: 0 success (warnings may be printed), 1 Hydra could not compose the config (or an
unexpected error / a debug traceback), 2 a user error (`error: <message>`, one line, no traceback),
3 a numerical error (the model or the sampler produced NaN / inf). `FASTSAMPLE_DEBUG=1` shows the
traceback of any user error. `docs/reliability.md` explains resuming, run states and atomic outputs.

| case | input | command | message | exit |
|---|---|---|---|---:|
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(rows: list[tuple[Case, Outcome]]) -> str:
    """The Markdown document for ``rows``."""
    lines = [
        f"| `{case.name}` | {_cell(case.input)} | `{_cell(case.command())}` | "
        f"{_cell(outcome.message)} | {outcome.exit_code} |"
        for case, outcome in rows
    ]
    return HEADER + "\n".join(lines) + "\n"


def parse(text: str) -> dict[str, Outcome]:
    """The documented outcome of each case name in a rendered document."""
    outcomes = {}
    for line in text.splitlines():
        match = re.match(r"^\| `([^`]+)` \|.*\| (.*) \| (\d+) \|$", line)
        if match:
            outcomes[match[1]] = Outcome(match[2].replace("\\|", "|"), int(match[3]))
    return outcomes


def main(names: list[str]) -> None:
    """Run every case (or only ``names``, printing them without writing the document)."""
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for case in CASES:
            if names and case.name not in names:
                continue
            outcome = run_case(case, Path(folder) / case.name)
            print(f"{case.name}: exit {outcome.exit_code}: {outcome.message}", file=sys.__stderr__)
            rows.append((case, outcome))
    wrong = [case.name for case, outcome in rows if not matches(case, outcome)]
    if wrong:
        raise SystemExit(f"message or exit code not as the catalog expects: {', '.join(wrong)}")
    if names:
        return
    DOC.write_text(render(rows))
    print(f"wrote {DOC}", file=sys.__stderr__)


if __name__ == "__main__":
    main(sys.argv[1:])
