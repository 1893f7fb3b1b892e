"""Feature extractors for the sample-quality metrics, and streaming extraction into :class:`FeatureStats`.

Every extractor is a :class:`FeatureExtractor`: ``extractor(images) -> {"features": (N, F),
"logits": (N, K) or None}`` for ``images`` either uint8 (N, H, W, C) or float (N, C, H, W) in [-1, 1].
Float images are first rounded to uint8 exactly as samples are when saved as PNG (EDM's rounding), so
a sample set scores the same from memory as from its image files. ``name`` and ``weights_hash`` tag
reference statistics, so stats from one extractor are never compared with features of another.

Choice of Inception network (:class:`CleanFIDInception`): clean-fid's TorchScript translation of the
TF Inception graph, ``inception-2015-12-05.pt``, the same network StyleGAN2-ADA and EDM use, and clean-fid's
"clean" preprocessing (PIL bicubic resize to 299 on float pixels). The TorchScript module exposes its
pooled-feature trunk (``layers``) and its 1008-way classifier (``output``), so one pass gives both the
2048-d features and the logits: ``features @ output.weight.T`` without the bias, which is exactly what
StyleGAN / EDM feed to the softmax for the Inception Score (``no_output_bias=True``). torch-fidelity's
Inception (also used by torchmetrics) has the same weights re-packaged but resizes with its own bilinear
TF emulation; one network that gives clean-fid FID, EDM-comparable FID (``mode="legacy_tensorflow"``,
the network's built-in resize, as EDM's ``cifar10-32x32.npz`` was made) and IS was the simpler choice.

For MNIST-like data a domain classifier's features ("Frechet classifier distance") fit better:
:class:`ClassifierFeatures` wraps any classifier with ``features(x, noise_labels)`` and
``forward(x, noise_labels)``; :class:`ModuleFeatures` wraps any image -> features module.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastsample.metrics.stats import ArrayLike, FeatureStats
from fastsample.utils.errors import check_choice, fail
from fastsample.utils.hashing import HASH_LENGTH, module_hash  # module_hash re-exported: metrics API
from fastsample.utils.images import to_uint8
from fastsample.utils.io import atomic_path

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_ENV = "FASTSAMPLE_INCEPTION"
INCEPTION_MODES = {"clean": "inception-v3-clean", "legacy_tensorflow": "inception-v3-legacy-tf"}

Output = dict[str, torch.Tensor | None]


class FeatureExtractor(nn.Module):
    """Base class: ``forward(images) -> {"features": (N, F), "logits": (N, K) or None}``, no gradients.

    Subclasses set ``name``, ``input_range`` (the float range their network expects), ``channels``
    (3 makes grayscale inputs repeat to RGB; ``None`` keeps the input's channels) and implement
    :meth:`embed`; :meth:`preprocess` may be overridden (the Inception resize does).
    """

    name: str = "features"
    input_range: tuple[float, float] = (-1.0, 1.0)
    channels: int | None = None

    def __init__(self) -> None:
        super().__init__()
        # An empty buffer that follows .to(device), so lazily built networks know where to go.
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)

    @property
    def device(self) -> torch.device:
        """Device the extractor runs on: its network's (a wrapped module may live on the GPU already)."""
        return next(self.parameters(), self._anchor).device

    @property
    def weights_hash(self) -> str:
        """Short hash identifying the network's weights."""
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, images: ArrayLike) -> Output:
        with eval_mode(self):
            features, logits = self.embed(self.preprocess(images))
        return {"features": features.flatten(1), "logits": logits}

    def preprocess(self, images: ArrayLike) -> torch.Tensor:
        """uint8 NHWC or [-1, 1] NCHW images -> float NCHW tensor in ``input_range`` on ``device``."""
        pixels = torch.from_numpy(pixels_uint8(images, self.channels)).to(self.device)
        low, high = self.input_range
        # contiguous NCHW: a permuted 1-channel batch counts as channels-last, where GroupNorm is ~8x slower
        return pixels.permute(0, 3, 1, 2).float().contiguous() * ((high - low) / 255.0) + low

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Preprocessed batch -> (features, logits or None)."""
        raise NotImplementedError


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Evaluate in eval mode (batch norm, dropout), then restore each submodule's own mode.

    Restoring per submodule matters for a wrapped classifier that is shared with a training loop.
    """
    modes = [(sub, sub.training) for sub in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for sub, training in modes:
            sub.training = training


def pixels_uint8(images: ArrayLike, channels: int | None = None) -> np.ndarray:
    """Images as uint8 (N, H, W, C); grayscale repeated to RGB when ``channels == 3``.

    uint8 input must already be (N, H, W, C); float input is (N, C, H, W) in [-1, 1].
    """
    if isinstance(images, torch.Tensor):
        is_uint8 = images.dtype == torch.uint8
        pixels = images.detach().cpu().numpy() if is_uint8 else None
    else:
        is_uint8 = np.asarray(images).dtype == np.uint8
        pixels = np.asarray(images) if is_uint8 else None
    if pixels is None:
        images = torch.as_tensor(images)
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            fail(f"float images must be (N, C, H, W) with C in (1, 3) in [-1, 1], got {tuple(images.shape)}")
        pixels = to_uint8(images)
    if pixels.ndim != 4 or pixels.shape[-1] not in (1, 3):
        fail(f"uint8 images must be (N, H, W, C) with C in (1, 3), got {pixels.shape}")
    if channels == 3 and pixels.shape[-1] == 1:
        pixels = np.repeat(pixels, 3, axis=-1)
    if channels is not None and pixels.shape[-1] != channels:
        fail(f"the feature extractor needs {channels}-channel images, got {pixels.shape[-1]} channels")
    return pixels


# --------------------------------------------------------------------------------------------------
# Inception (clean-fid's TorchScript network)


class CleanFIDInception(FeatureExtractor):
    """clean-fid's Inception-v3 (2048-d pool features, 1008 logits), network loaded on first use.

    Args:
        mode: ``clean`` (clean-fid: PIL bicubic resize to 299 outside the network) or
            ``legacy_tensorflow`` (the network's own TF-style resize, as StyleGAN / EDM reference stats).
        weights_path: the ``inception-2015-12-05.pt`` file; default ``$FASTSAMPLE_INCEPTION``, then
            where clean-fid keeps it (``/tmp``), downloading it there if ``download``.
        download: allow the download from clean-fid's URL when no file is found.
    """

    input_range = (0.0, 255.0)
    channels = 3
    num_features = 2048  # torchmetrics reads this attribute

    def __init__(
        self, mode: str = "clean", weights_path: str | os.PathLike | None = None, download: bool = True
    ) -> None:
        super().__init__()
        check_choice("features.mode", mode, INCEPTION_MODES)
        self.mode = mode
        self.name = INCEPTION_MODES[mode]
        self.weights_path = None if weights_path is None else Path(weights_path)
        self.download = download
        self.net: nn.Module | None = None
        self._hash: str | None = None

    @property
    def weights_hash(self) -> str:
        if self._hash is None:
            self._hash = file_hash(inception_weights(self.weights_path, self.download))
        return self._hash

    def network(self) -> nn.Module:
        """The TorchScript network, loaded (and downloaded if allowed) on the first call."""
        if self.net is None:
            path = inception_weights(self.weights_path, self.download)
            with warnings.catch_warnings():
                # The file is TorchScript, so there is no alternative to the deprecated loader.
                warnings.simplefilter("ignore", FutureWarning)
                self.net = torch.jit.load(str(path), map_location=self.device).eval()
        return self.net

    def preprocess(self, images: ArrayLike) -> torch.Tensor:
        pixels = pixels_uint8(images, self.channels)
        if self.mode == "clean":
            pixels = np.stack([_clean_resizer()(image) for image in pixels])  # float32 in [0, 255]
        return torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device).permute(0, 3, 1, 2).float()

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        net = self.network()
        if self.mode == "clean":
            # What clean-fid's InceptionV3W does for pre-resized input: normalise, then the trunk.
            features = net.layers((x - 128.0) / 128.0).reshape(len(x), -1)
        else:
            features = net(x, return_features=True)
        return features, F.linear(features, net.output.weight)


def _clean_resizer():
    from cleanfid.resize import build_resizer

    return build_resizer("clean")


def cleanfid_weights_dir() -> Path:
    """Where clean-fid itself downloads and looks for the Inception file (see cleanfid/features.py)."""
    return Path("./" if platform.system() == "Windows" else "/tmp")


def inception_url() -> str:
    """The URL clean-fid downloads ``inception-2015-12-05.pt`` from."""
    from cleanfid.downloads_helper import inception_url as url

    return url


def inception_weights(explicit: Path | None = None, download: bool = True) -> Path:
    """Path of the Inception weights: ``explicit``, ``$FASTSAMPLE_INCEPTION``, or clean-fid's folder.

    A path given explicitly or by the environment must exist. Otherwise the file is looked for (and, if
    ``download``, downloaded atomically) where clean-fid keeps it, so both share one copy.
    """
    env = os.environ.get(INCEPTION_ENV)
    for given, setting in ((explicit, "features.weights_path"), (env, f"${INCEPTION_ENV}")):
        if given:
            if not Path(given).is_file():
                fail(f"{setting}={str(given)!r}: no such file (expected clean-fid's {INCEPTION_FILE})")
            return Path(given)
    default = cleanfid_weights_dir() / INCEPTION_FILE
    if default.is_file():
        return default
    url = inception_url()
    reason = "downloads are disabled"
    if download:
        try:
            download_file(url, default)
            return default
        except (urllib.error.URLError, OSError) as err:
            reason = f"download failed: {err}"
    fail(
        f"Inception weights {INCEPTION_FILE} not found and {reason}; fetch {url} on a connected machine "
        f"and put it at {default} or point ${INCEPTION_ENV} (or features.weights_path) to it"
    )


def download_file(url: str, path: Path, timeout: float = 60.0) -> None:
    """Download ``url`` to ``path`` atomically (a broken transfer leaves no partial file behind)."""
    with (
        urllib.request.urlopen(url, timeout=timeout) as response,
        atomic_path(path) as tmp,
        open(tmp, "wb") as handle,
    ):
        while chunk := response.read(1 << 20):
            handle.write(chunk)


def file_hash(path: Path) -> str:
    """Short sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:HASH_LENGTH]


# --------------------------------------------------------------------------------------------------
# User networks


class ModuleFeatures(FeatureExtractor):
    """Any ``nn.Module`` mapping a float (N, C, H, W) batch to features.

    The module may return a tensor (features), a tuple ``(features, logits)`` or a dict with keys
    ``features`` and optionally ``logits``. Its name is ``<label>:<weights hash>``.

    Args:
        module: the network; it runs in eval mode (its own mode is restored afterwards).
        label: name prefix (default: the module's class name).
        input_range: float range the module expects its pixels in.
        channels: channels it expects (3 repeats grayscale inputs), or ``None`` for the input's own.
    """

    def __init__(
        self,
        module: nn.Module,
        label: str | None = None,
        input_range: tuple[float, float] = (-1.0, 1.0),
        channels: int | None = None,
    ) -> None:
        super().__init__()
        self.module = module
        self.label = label or type(module).__name__
        self.input_range = (float(input_range[0]), float(input_range[1]))
        self.channels = channels

    @property
    def name(self) -> str:  # hashed on demand: the wrapped module may still be training
        return f"{self.label}:{self.weights_hash}"

    @property
    def weights_hash(self) -> str:
        return module_hash(self.module)

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        output = self.module(x)
        if isinstance(output, dict):
            return output["features"], output.get("logits")
        if isinstance(output, (tuple, list)):
            return output[0], (output[1] if len(output) > 1 else None)
        return output, None


class ClassifierFeatures(ModuleFeatures):
    """A noise-conditional classifier evaluated on clean images: ``features(x, labels)`` and its logits.

    Duck-typed: any module with ``features(x, noise_labels)`` and ``forward(x, noise_labels) -> logits``
    (e.g. ``fastsample.models.classifier.NoisyClassifier``); a ``features_and_logits(x, noise_labels)``
    method, when present, gives both from one pass. ``noise_label`` is the conditioning value
    passed for clean input, one per image. Named ``classifier:<weights hash>``.
    """

    def __init__(
        self,
        classifier: nn.Module,
        noise_label: float = 0.0,
        input_range: tuple[float, float] = (-1.0, 1.0),
        channels: int | None = None,
    ) -> None:
        if not callable(getattr(classifier, "features", None)):
            fail(
                f"{type(classifier).__name__} has no features(x, noise_labels) method; "
                "wrap it with ModuleFeatures instead"
            )
        super().__init__(classifier, "classifier", input_range, channels)
        self.noise_label = float(noise_label)

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.full((len(x),), self.noise_label, device=x.device)
        if callable(getattr(self.module, "features_and_logits", None)):
            return self.module.features_and_logits(x, labels)  # one pass through the network
        return self.module.features(x, labels), self.module(x, labels)


# --------------------------------------------------------------------------------------------------
# Streaming extraction


def iter_batches(images: ArrayLike | Iterable, batch_size: int) -> Iterator[ArrayLike]:
    """Chunks of at most ``batch_size`` images from an array, or from an iterable of batches.

    Items of an iterable that are tuples / lists (a DataLoader's ``(images, labels)``) give their first
    element.
    """
    if batch_size < 1:
        fail(f"batch_size={batch_size} must be at least 1")
    batches = [images] if isinstance(images, (torch.Tensor, np.ndarray)) else images
    for batch in batches:
        if isinstance(batch, (tuple, list)):
            batch = batch[0]
        for start in range(0, len(batch), batch_size):
            yield batch[start : start + batch_size]


def extract(
    extractor: FeatureExtractor,
    images: ArrayLike | Iterable,
    batch_size: int = 256,
    *,
    keep_features: int = 0,
    keep_logits: int = 0,
    stats: FeatureStats | None = None,
) -> FeatureStats:
    """Run ``extractor`` over ``images`` in batches and accumulate a :class:`FeatureStats`.

    ``keep_features`` / ``keep_logits`` cap the raw rows kept (for KID, precision / recall, IS); pass
    ``stats`` to continue an existing accumulator.
    """
    stats = FeatureStats(keep_features, keep_logits) if stats is None else stats
    for batch in iter_batches(images, batch_size):
        output = extractor(batch)
        stats.update(output["features"], output["logits"])
    return stats
