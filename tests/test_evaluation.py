"""Tests of fastsample.jobs.evaluation and evaluate.py: metric sanity with a small trained domain classifier
(sklearn's digits), the Evaluator's input checks, the job's three modes and the FID training callback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastsample.jobs.evaluation import evaluate
from fastsample.lit.loading import classifier_features
from fastsample.metrics import ClassifierFeatures, ModuleFeatures, load_reference
from fastsample.metrics.evaluator import Evaluator, read_reference, save_reference_file
from fastsample.models.classifier import NoisyClassifier
from fastsample.utils.errors import UserError
from fastsample.utils.io import save_npz_atomic

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


NET_CONFIG = {
    "_target_": "fastsample.models.classifier.NoisyClassifier",
    "in_channels": 1,
    "num_classes": 10,
    "image_size": 8,
    "model_channels": 16,
    "channel_mult": [1, 2],
    "num_res_blocks": 1,
    "attention_resolutions": [],
    "groups": 4,
    "mid_attention": False,
}


def tiny_classifier(seed: int = 0) -> NoisyClassifier:
    torch.manual_seed(seed)
    return NoisyClassifier(**{k: v for k, v in NET_CONFIG.items() if k != "_target_"})


@pytest.fixture(scope="module")
def digits_split(digits):
    """Digits as float32 [-1, 1] images: (train images, train labels, test images)."""
    images, labels = digits
    images = images.float()
    return images[:1400], labels[:1400], images[1400:]


@pytest.fixture(scope="module")
def classifier(digits_split) -> NoisyClassifier:
    """A small domain classifier trained for a few seconds on the digits (~89% test accuracy)."""
    images, labels, _ = digits_split
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    net = tiny_classifier()
    optimizer = torch.optim.Adam(net.parameters(), 5e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(100):
        index = torch.randint(0, len(images), (64,), generator=generator)
        loss = F.cross_entropy(net(images[index], 0.0), labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.set_num_threads(previous)
    return net.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def train_reference(classifier, digits_split):
    """Reference statistics of the digits' training part (with all 1400 raw features)."""
    return Evaluator(ClassifierFeatures(classifier), batch_size=500).build_reference(digits_split[0])


@pytest.fixture
def evaluator(classifier, train_reference) -> Evaluator:
    return Evaluator(
        ClassifierFeatures(classifier), train_reference, batch_size=500, kid_subsets=20, kid_subset_size=200
    )


def noise_like(images: torch.Tensor, level: float, seed: int = 0) -> torch.Tensor:
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    return (images + level * noise).clamp(-1, 1)


def blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    from torchvision.transforms.functional import gaussian_blur

    return images if sigma == 0 else gaussian_blur(images, kernel_size=5, sigma=sigma)


# ------------------------------------------------------------------------------------------------
# Metric sanity on real data


def test_fid_sanity_train_test_noise_and_itself(evaluator, digits_split):
    train, _, test = digits_split
    assert evaluator.reference.count == 1400 and evaluator.reference.resolution == 8
    held_out = evaluator.score_images(test)
    uniform = torch.rand(test.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    noise = evaluator.score_images(uniform)
    assert held_out["fid"] < 0.1 * noise["fid"]
    assert held_out["kid_mean"] < 0.1 * noise["kid_mean"]
    # Noise features spread widely (high recall), but few land near real digits (lower precision).
    assert held_out["precision"] > 0.8 and noise["precision"] < held_out["precision"] - 0.15
    itself = evaluator.score_images(train)
    assert abs(itself["fid"]) < 1e-6 * noise["fid"]
    assert itself["precision"] == itself["recall"] == 1.0
    assert abs(itself["kid_mean"]) < 0.05 * noise["kid_mean"]  # different random subsets: ~0, not 0
    # IS: real digits are confidently and diversely classified, noise much less so; one image: IS = 1.
    assert held_out["is_mean"] > 5.0 and noise["is_mean"] < 0.6 * held_out["is_mean"]
    constant = evaluator.score_images(torch.zeros(50, 1, 8, 8))
    assert constant["is_mean"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize(
    "corrupt, levels", [(noise_like, (0.0, 0.3, 0.6, 1.0)), (blur, (0.0, 0.6, 1.0, 2.0))]
)
def test_fid_grows_monotonically_with_corruption(evaluator, digits_split, corrupt, levels):
    _, _, test = digits_split
    fids = [evaluator.score_images(corrupt(test, level))["fid"] for level in levels]
    assert all(a < b for a, b in zip(fids, fids[1:])), fids


def test_uint8_float_and_folder_inputs_agree(evaluator, digits_split, tmp_path):
    from fastsample.utils.images import save_png, to_uint8

    _, _, test = digits_split
    as_uint8 = to_uint8(test)
    from_float = evaluator.score_images(test)
    # A list of batches of several sizes, the uint8 array, a samples.npz and a folder of PNGs agree.
    batches = [as_uint8[:100], as_uint8[100:101], as_uint8[101:]]
    save_npz_atomic(tmp_path / "samples.npz", images=as_uint8, labels=np.zeros(len(as_uint8)))
    for index, image in enumerate(as_uint8):
        save_png(image, tmp_path / "pngs" / f"{index:06d}.png")
    for scores in (
        evaluator.score_images(batches),
        evaluator.score_images(as_uint8),
        evaluator.score_npz(tmp_path / "samples.npz"),
        evaluator.score_folder(tmp_path / "pngs"),
    ):
        assert scores["num_samples"] == len(test)
        assert scores["fid"] == pytest.approx(from_float["fid"], rel=1e-6)
        assert scores["precision"] == from_float["precision"]


def test_evaluator_fid_matches_torchmetrics_with_the_same_module(digits_split):
    from torchmetrics.image.fid import FrechetInceptionDistance

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 12)).eval()

    class OnUint8(nn.Module):  # torchmetrics feeds uint8 (N, C, H, W) to a custom feature module
        num_features = 12

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return net(x.float() / 127.5 - 1)

    from fastsample.utils.images import to_uint8

    train, _, test = digits_split
    real, fake = to_uint8(train), to_uint8(noise_like(test, 0.2))
    evaluator = Evaluator(ModuleFeatures(net), scores=["fid"], batch_size=333)
    evaluator.reference = evaluator.build_reference(real)
    metric = FrechetInceptionDistance(feature=OnUint8())
    metric.update(torch.from_numpy(real).permute(0, 3, 1, 2), real=True)
    metric.update(torch.from_numpy(fake).permute(0, 3, 1, 2), real=False)
    assert evaluator.score_images(fake)["fid"] == pytest.approx(float(metric.compute()), rel=1e-5)


# ------------------------------------------------------------------------------------------------
# Reference files


def test_reference_file_round_trip_with_features(evaluator, digits_split, tmp_path):
    train, _, _ = digits_split
    evaluator.keep_features = 300
    ref = evaluator.build_reference(train, dataset="digits", split="train", path=tmp_path / "ref.npz")
    loaded = read_reference(tmp_path / "ref.npz")
    assert loaded.features.shape == (300, 32) and loaded.count == 1400 and loaded.dataset == "digits"
    np.testing.assert_array_equal(loaded.mu, ref.mu)
    assert load_reference(tmp_path / "ref.npz").extractor == evaluator.extractor.name  # EDM-style keys intact
    with np.load(tmp_path / "ref.npz") as data:
        assert {"mu", "sigma", "features", "extractor", "weights_hash"} <= set(data.files)
    # EDM-style files (mu / sigma only) give FID and IS; KID / PR are skipped with a warning.
    save_npz_atomic(tmp_path / "edm.npz", mu=ref.mu, sigma=ref.sigma)
    with pytest.warns(UserWarning, match="do not record their feature extractor"):
        evaluator.reference = tmp_path / "edm.npz"
    with pytest.warns(UserWarning, match="KID, PR skipped"):
        scores = evaluator.score_images(train[:100])
    assert "fid" in scores and "is_mean" in scores and "kid_mean" not in scores


def test_reference_from_another_extractor_is_refused(evaluator, digits_split, tmp_path):
    train, _, _ = digits_split
    other = Evaluator(ClassifierFeatures(tiny_classifier(seed=1)))
    save_reference_file(tmp_path / "other.npz", other.build_reference(train[:100]))
    with pytest.raises(UserError) as info:
        evaluator.reference = tmp_path / "other.npz"
    assert other.extractor.name in str(info.value) and evaluator.extractor.name in str(info.value)


# ------------------------------------------------------------------------------------------------
# Bad input


def test_bad_inputs_name_what_is_expected(evaluator, digits_split, tmp_path):
    _, _, test = digits_split
    cases = [
        (np.zeros((4, 8, 8), np.uint8), r"uint8 images must be \(N, H, W, C\)"),
        (np.zeros((4, 8, 8, 3), np.uint8), r"images are 3x8x8 \(C x H x W\) .* expects 1x8x8"),
        (torch.zeros(4, 1, 16, 16), r"images are 1x16x16 .* expects 1x8x8"),
        (torch.zeros(4, 8, 8, 1), r"float images must be \(N, C, H, W\)"),
        (torch.zeros(4, 1, 8, 8, dtype=torch.int64), "must be uint8 .* or float .* got dtype torch.int64"),
        (torch.full((4, 1, 8, 8), 200.0), r"must be in \[-1, 1\].*0-255 pixels"),
        ([test[:10], test[:10, :, :4, :4]], "image shape changed from 1x8x8 to 1x4x4"),
    ]
    for images, message in cases:
        with pytest.raises(UserError, match=message):
            evaluator.score_images(images)
    for count in (0, 1):
        with pytest.raises(UserError, match=f"need at least 2 samples, got {count}"):
            evaluator.score_images(test[:count])
    save_npz_atomic(tmp_path / "float.npz", images=np.zeros((4, 8, 8, 1)))
    with pytest.raises(UserError, match="images are float64, expected uint8 \\(N, H, W, C\\)"):
        evaluator.score_npz(tmp_path / "float.npz")
    save_npz_atomic(tmp_path / "keys.npz", pictures=np.zeros((4, 8, 8, 1), np.uint8))
    with pytest.raises(UserError, match="lacks an 'images' array \\(has: pictures\\)"):
        evaluator.score_npz(tmp_path / "keys.npz")
    with pytest.raises(UserError, match="does not exist"):
        evaluator.score_npz(tmp_path / "missing.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no image files"):
        evaluator.score_folder(tmp_path / "empty")
    with pytest.raises(UserError, match="scores='fd' is not allowed"):
        Evaluator(evaluator.extractor, scores=["fd"])


# ------------------------------------------------------------------------------------------------
# The job: evaluate.py's three modes on GMM samples


@pytest.fixture
def classifier_bundle(classifier, tmp_path) -> Path:
    """The trained test classifier exported as a clean classifier bundle (what train.py writes)."""
    from fastsample.models.bundle import CLASSIFIER_FORMAT
    from fastsample.models.sigma_classifier import input_convention
    from fastsample.utils.io import save_torch_atomic

    path = tmp_path / "classifier.pt"
    save_torch_atomic(
        path,
        {
            "format": CLASSIFIER_FORMAT,
            "net": NET_CONFIG,
            "noisy": False,
            "input": input_convention(noisy=False),
            "image_shape": [1, 8, 8],
            "num_classes": 10,
            "state_dict": classifier.state_dict(),
        },
    )
    return path


def compose(config: str, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config, overrides=overrides)


def test_classifier_config_and_missing_file(classifier, classifier_bundle, tmp_path):
    extractor = classifier_features(classifier_bundle)
    # Named by the raw network's weights: the same extractor as ClassifierFeatures(network) elsewhere.
    assert extractor.name == ClassifierFeatures(classifier).name
    with pytest.raises(UserError, match="features.path=.*nothing.pt"):
        classifier_features(tmp_path / "nothing.pt")


def test_evaluate_job_ref_score_generate(classifier_bundle, tmp_path):
    from fastsample.jobs.sampling import generate

    common = [f"paths.cache_dir={tmp_path / 'cache'}", "dataset=digits", "model=gmm_digits", "device=cpu"]
    sample_cfg = compose(
        "sample",
        [
            *common,
            f"paths.output_dir={tmp_path / 'samples'}",
            "seeds=0-299",
            "sampler=dpmpp_2m",
            "sampler.steps=8",
        ],
    )
    generate(sample_cfg)
    samples = tmp_path / "samples" / "samples.npz"
    eval_common = [
        *common,
        f"features.path={classifier_bundle}",
        "evaluator.kid_subsets=10",
        "evaluator.kid_subset_size=100",
    ]

    ref = evaluate(
        compose("evaluate", [*eval_common, "mode=ref", "split=train", f"paths.output_dir={tmp_path}/r"])
    )
    assert ref["count"] == 1438 and Path(ref["reference"]).is_file()

    out = tmp_path / "score"
    summary = evaluate(
        compose(
            "evaluate",
            [
                *eval_common,
                "mode=score",
                f"samples={samples}",
                f"ref={ref['reference']}",
                f"paths.output_dir={out}",
                "logger=csv",
            ],
        )
    )
    metrics = summary["metrics"]
    assert metrics["num_samples"] == 300
    assert {"fid", "is_mean", "is_std", "kid_mean", "kid_std", "precision", "recall"} <= set(metrics)
    assert json.loads((out / "metrics.json").read_text())["metrics"] == pytest.approx(metrics)
    logged = next(out.rglob("metrics.csv")).read_text()
    assert "eval/fid" in logged

    # ref=null: the dataset's statistics are built once and cached under paths.cache_dir.
    cached = evaluate(
        compose(
            "evaluate",
            [*eval_common, "mode=score", f"samples={samples}", f"paths.output_dir={tmp_path}/cached"],
        )
    )
    assert cached["metrics"]["fid"] == pytest.approx(metrics["fid"], rel=1e-9)
    assert len(list((tmp_path / "cache" / "references").glob("digits-train-*.npz"))) == 1

    # generate: the same seeds and sampler give the same images as sample.py, so the same scores.
    generated = evaluate(
        compose(
            "evaluate",
            [
                *eval_common,
                "mode=generate",
                "seeds=0-299",
                "sampler=dpmpp_2m",
                "sampler.steps=8",
                "batch_size=128",
                f"ref={ref['reference']}",
                f"paths.output_dir={tmp_path}/gen",
            ],
        )
    )
    assert generated["metrics"]["fid"] == pytest.approx(metrics["fid"], rel=1e-6)
    assert generated["nfe"] == generated["metrics"]["nfe"] == 8 and generated["metrics"]["sampling_s"] > 0
    # A worse sampler (Euler with 2 steps) scores worse.
    coarse = evaluate(
        compose(
            "evaluate",
            [
                *eval_common,
                "mode=generate",
                "seeds=0-299",
                "sampler=euler",
                "sampler.steps=2",
                f"ref={ref['reference']}",
                f"paths.output_dir={tmp_path}/coarse",
            ],
        )
    )
    assert coarse["metrics"]["fid"] > generated["metrics"]["fid"]

    with pytest.raises(UserError, match="mode=score needs samples="):
        evaluate(
            compose(
                "evaluate",
                [*eval_common, "mode=score", f"ref={ref['reference']}", f"paths.output_dir={tmp_path}/bad"],
            )
        )
    with pytest.raises(UserError, match="mode='check' is not allowed"):
        evaluate(compose("evaluate", [*eval_common, "mode=check", f"paths.output_dir={tmp_path}/bad"]))


def test_evaluate_cli_reports_user_errors_in_one_line(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("FASTSAMPLE_DEBUG", None)
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "evaluate.py"),
            "mode=score",
            "samples=x.npz",
            "dataset=digits",
            f"features.path={tmp_path / 'no-classifier.pt'}",
            f"hydra.run.dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: features.path=")
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------------------------------------
# The training callback


def test_fid_callback_logs_val_fid(classifier, digits_split, digits_gmm, tmp_path):
    from fastsample.lit.fid_callback import FIDCallback

    train, _, _ = digits_split
    ref = Evaluator(ClassifierFeatures(classifier)).build_reference(train, path=tmp_path / "ref.npz")

    class Module:  # what the callback needs of a DiffusionModule
        device = torch.device("cpu")
        num_classes = None
        image_shape = (1, 8, 8)
        logged: dict = {}

        def denoiser(self, ema: bool = True):
            assert ema
            return digits_gmm

        def log(self, name, value, **kwargs):
            self.logged[name] = float(value)

    class Trainer:
        global_step = 4
        is_global_zero = True
        datamodule = None

    callback = FIDCallback(
        every_n_steps=2,
        num_samples=120,
        sampler="dpmpp_2m",
        steps=6,
        extractor=ClassifierFeatures(classifier),
        reference=str(ref.path),
        kid_subset_size=50,
    )
    module, trainer = Module(), Trainer()
    callback.on_fit_start(trainer, module)
    callback.on_train_batch_end(trainer, module, None, None, 0)
    first = dict(module.logged)
    assert set(first) == {"val/fid", "val/kid"} and first["val/fid"] > 0
    trainer.global_step = 6
    callback.on_train_batch_end(trainer, module, None, None, 0)
    assert module.logged["val/fid"] == pytest.approx(first["val/fid"], rel=1e-9)  # fixed seeds
    for step in (6, 7, 0):  # the same step again (gradient accumulation), off-schedule, untrained
        trainer.global_step = step
        module.logged.clear()
        callback.on_train_batch_end(trainer, module, None, None, 0)
        assert module.logged == {}


def test_fid_callback_in_a_lightning_run(classifier, tmp_path):
    """Two training steps of a tiny UNet on the digits: the reference is built from the datamodule's
    test split at fit start and val/fid, val/kid reach the logger."""
    import pytorch_lightning as pl
    from omegaconf import OmegaConf

    from fastsample.data import ImageDataModule
    from fastsample.lit.diffusion import DiffusionModule
    from fastsample.lit.fid_callback import FIDCallback

    torch.manual_seed(0)
    net = OmegaConf.load(CONF / "net" / "unet_tiny.yaml")
    module = DiffusionModule(net=net, ema_decay=0.5)
    datamodule = ImageDataModule("digits", batch_size=32, val_subset=200)
    callback = FIDCallback(
        every_n_steps=2,
        num_samples=40,
        sampler="euler",
        steps=2,
        extractor=ClassifierFeatures(classifier),
        kid_subset_size=20,
        reference_out=tmp_path / "ref.npz",
    )
    logger = pl.loggers.CSVLogger(tmp_path, name="csv")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=2,
        limit_val_batches=0,
        logger=logger,
        log_every_n_steps=1,
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=datamodule)
    assert read_reference(tmp_path / "ref.npz").count == 200
    assert {"val/fid", "val/kid"} <= set(trainer.callback_metrics)
    logged = next(tmp_path.rglob("metrics.csv")).read_text()
    assert "val/fid" in logged.splitlines()[0]


def test_fid_vs_nfe_benchmark_writes_table_plot_and_class_accuracy(classifier_bundle, tmp_path):
    """The engine of `make demo` / bench/fid_vs_nfe.py: rows per (sampler, steps), same seeds, files."""
    from fastsample.jobs.benchmark import BenchSettings, fid_vs_nfe

    settings = BenchSettings(
        samplers=("euler", "dpmpp_2m"),
        steps=(2, 8),
        num_samples=120,
        model="gmm_digits",
        dataset="digits",
        split="train",
        device="cpu",
        out=str(tmp_path / "bench"),
    )
    overrides = [f"features.path={classifier_bundle}", f"paths.cache_dir={tmp_path / 'cache'}"]
    rows = fid_vs_nfe(settings, [*overrides, "class_labels=cycle", "evaluator.kid_subset_size=100"])
    assert [(row["sampler"], row["steps"]) for row in rows] == [
        ("exact", 0),
        ("euler", 2),
        ("euler", 8),
        ("dpmpp_2m", 2),
        ("dpmpp_2m", 8),
    ]
    by_key = {(row["sampler"], row["steps"]): row for row in rows}
    # More steps -> closer to the mixture; the class-conditional mixture's samples carry their label.
    assert by_key[("dpmpp_2m", 8)]["fid"] < by_key[("euler", 2)]["fid"]
    assert by_key[("dpmpp_2m", 8)]["class_accuracy"] > 0.7
    assert by_key[("exact", 0)]["class_accuracy"] is None
    for name in ("fid_vs_nfe.csv", "fid_vs_nfe.md", "fid_vs_nfe.png"):
        assert (tmp_path / "bench" / name).stat().st_size > 0
    # --merge: rows of several runs' CSVs read back exactly, as one table and plot, without sampling
    from fastsample.jobs.benchmark import merge_runs, read_csv

    assert read_csv(tmp_path / "bench" / "fid_vs_nfe.csv") == rows
    csv_path = str(tmp_path / "bench" / "fid_vs_nfe.csv")
    merged = merge_runs([csv_path, csv_path], tmp_path / "merged", "two runs")
    assert merged == rows + rows and (tmp_path / "merged" / "fid_vs_nfe.png").stat().st_size > 0
    with pytest.raises(UserError, match="--merge: .*missing.csv does not exist"):
        merge_runs([str(tmp_path / "missing.csv")], tmp_path / "merged", "none")


def test_benchmark_sampler_specs_carry_schedules():
    from fastsample.jobs.benchmark import parse_sampler_spec

    assert parse_sampler_spec("heun", 5) == ("heun", ["sampler=heun", "sampler.steps=5"])
    label, overrides = parse_sampler_spec("dpmpp_2m@loglinear", 10)
    assert label == "dpmpp_2m@loglinear" and overrides[-1] == "sampler.schedule.kind=loglinear"
    label, overrides = parse_sampler_spec("dpmpp_2m@file:s/schedule-dpmpp_2m-nfe{steps}-gits.yaml", 5)
    assert label == "dpmpp_2m@gits"
    assert overrides[-2:] == [
        "sampler.schedule.kind=file",
        "++sampler.schedule.path=s/schedule-dpmpp_2m-nfe5-gits.yaml",
    ]
