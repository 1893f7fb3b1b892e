"""Generator priors for ES-DDPM: anything that turns per-seed randomness into images ``x0'``.

ES-DDPM (Lyu et al. 2022) starts the reverse diffusion at an intermediate step from a *diffused
sample of a cheap generator*. A :class:`Generator` is that generator, behind one interface::

    prior.sample(count, generator, device=..., dtype=..., class_labels=None) -> (count, C, H, W) in [-1, 1]

Kinds (``conf/prior/*.yaml``):

* :class:`LatentGenerator`: any callable ``z -> x`` with ``z ~ N(0, I)`` (a VAE or GAN decoder);
  :func:`fastsample.lit.loading.vae_generator` builds one from a VAE bundle / checkpoint
  (``train.py task=vae``) and
  :class:`GaussianGenerator` is ``x0' = mean + std * z`` (``std = 1``: "naive truncation", pure VP
  noise at T'; small ``std``: the tests' reduction to the ordinary sampler).
* :class:`MixtureGenerator`: exact samples of an analytic Gaussian mixture (class labels honoured).
* :class:`NpzGenerator`: pre-generated samples in a ``.npz`` (how ES-DDPM uses GAN samples):
  uint8 ``(N, H, W, C)`` as ``sample.py`` writes them, or float ``(N, C, H, W)`` in [-1, 1].

Randomness: with a :class:`~fastsample.utils.seeding.SeedNoise` (one stream per sample seed) a prior
draws from *its own* per-seed streams (seed + :data:`PRIOR_STREAM_OFFSET` mod 2^32), so ``x0'``
depends only on
the seed, never on the batch, and the sampler's own streams (the diffusion noise and every stochastic
step) are exactly those of the ordinary sampler with the same seeds. An :class:`NpzGenerator` gives
seed ``k`` row ``k`` (or the row whose ``seeds`` entry is ``k``).

Control (the paper's Section 4.4): :func:`interpolate_latents` (semantic edits in the latent space)
and :func:`paste` / :func:`mask_edit` (local edits in pixels); the edited ``x0'`` then goes through
:meth:`fastsample.samplers.es_ddpm.ESDDPMSampler.sample` with ``x0=...``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from fastsample.utils.errors import check_choice, check_range, fail
from fastsample.utils.images import SAMPLE_KEYS, check_image_batch, from_uint8
from fastsample.utils.instantiation import instantiate
from fastsample.utils.seeding import SeedNoise

#: priors draw from seed + this offset (mod 2^32), apart from the sampler's streams of the same seeds.
#: torch's CPU generator keeps only the low 32 bits of a seed, so the offset must act below 2^32:
#: seeds below 2^31 (all practical ones) never share a stream with a prior's.
PRIOR_STREAM_OFFSET = 1 << 31
INTERPOLATIONS = ("slerp", "linear")
RandomSource = SeedNoise | torch.Generator | None


def prior_streams(generator: RandomSource) -> RandomSource:
    """The prior's random source for a sampler's ``generator``: per-seed streams of its own."""
    if isinstance(generator, SeedNoise):
        return SeedNoise([(seed + PRIOR_STREAM_OFFSET) % (1 << 32) for seed in generator.seeds])
    return generator


def standard_normal(
    shape: Sequence[int],
    count: int,
    generator: RandomSource,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``(count, *shape)`` standard normal numbers: one row per seed of a SeedNoise, else one draw."""
    if isinstance(generator, SeedNoise):
        if len(generator) != count:
            raise ValueError(f"{count} samples asked for but {len(generator)} seeds given")
        return generator.randn(shape, dtype=dtype, device=device)
    z = torch.randn((count, *shape), generator=generator, dtype=torch.float32)
    return z.to(device=device, dtype=dtype)


def _shape_text(shape: Sequence[int] | None) -> str:
    return "unknown" if shape is None else "(" + ", ".join(str(int(s)) for s in shape) + ")"


class Generator(nn.Module):
    """Base class: ``image_shape`` (C, H, W) and :meth:`sample`; ``latent_shape`` when it has latents."""

    image_shape: tuple[int, ...] | None = None
    latent_shape: tuple[int, ...] | None = None
    kind = "generator"

    def sample(
        self,
        count: int,
        generator: RandomSource = None,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        class_labels: Tensor | None = None,
    ) -> Tensor:
        """``count`` images ``(count, C, H, W)`` in [-1, 1].

        ``generator`` is the sampler's random source: with a SeedNoise, row ``k`` depends only on seed
        ``k`` (random priors draw from :func:`prior_streams`, files pick the seed's row).
        """
        raise NotImplementedError

    def bind(self, shape: Sequence[int], setting: str = "sampler.prior") -> Generator:
        """Check that the prior's images have the model's data ``shape`` (one clear error if not)."""
        if self.image_shape is not None and tuple(self.image_shape) != tuple(shape):
            fail(
                f"{setting} ({self.kind}) makes images of shape {_shape_text(self.image_shape)} but the "
                f"model's data shape is {_shape_text(shape)}; use a prior trained on the same data / "
                "resolution (C, H, W)"
            )
        return self

    def describe(self) -> dict[str, Any]:
        """What the prior is (recorded in run.json and benchmark tables)."""
        return {
            "kind": self.kind,
            "image_shape": None if self.image_shape is None else list(self.image_shape),
        }


class LatentGenerator(Generator):
    """Any callable ``fn(z) -> x`` with latents ``z ~ N(0, I)`` of ``latent_shape`` (VAE / GAN decoders).

    ``image_shape=None`` is found by calling ``fn`` once on a zero latent. The output is clamped to
    [-1, 1] (the data range) unless ``clamp=False``; ``module`` (default: ``fn`` if it is a module) is
    the network behind ``fn``: it follows the latents' device and keeps its own dtype.
    """

    kind = "callable"

    def __init__(
        self,
        fn: Callable[[Tensor], Tensor],
        latent_shape: Sequence[int] | int,
        image_shape: Sequence[int] | None = None,
        kind: str | None = None,
        clamp: bool = True,
        module: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if not callable(fn):
            fail(f"sampler.prior.fn must be a callable z -> x, got {type(fn).__name__}")
        self.fn = fn
        # the network behind fn (fn itself, or e.g. the VAE of vae.generate): moved to the latents' device
        self.module = module if module is not None else (fn if isinstance(fn, nn.Module) else None)
        latent_shape = (
            (latent_shape,) if isinstance(latent_shape, int) else tuple(int(s) for s in latent_shape)
        )
        if not latent_shape or min(latent_shape) < 1:
            fail(f"sampler.prior.latent_shape={list(latent_shape)} must be positive sizes")
        self.latent_shape = latent_shape
        self.kind = kind or self.kind
        self.clamp = clamp
        if image_shape is None:
            with torch.no_grad():
                image_shape = tuple(self.decode(torch.zeros(1, *latent_shape)).shape[1:])
        self.image_shape = tuple(int(s) for s in image_shape)

    def latents(
        self,
        count: int,
        generator: RandomSource = None,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """``(count, *latent_shape)`` standard normal latents (row ``k`` from seed ``k``'s prior stream)."""
        return standard_normal(self.latent_shape, count, prior_streams(generator), device, dtype)

    def decode(self, z: Tensor) -> Tensor:
        """Images for latents ``z`` (in [-1, 1] when ``clamp``)."""
        parameter = None if self.module is None else next(iter(self.module.parameters()), None)
        if parameter is not None:  # the network keeps its dtype; it follows the latents' device
            if parameter.device != z.device:
                self.module.to(z.device)
            z = z.to(dtype=parameter.dtype)
        x = self.fn(z)
        if not isinstance(x, Tensor) or x.ndim < 2 or x.shape[0] != z.shape[0]:
            fail(
                "sampler.prior.fn must return a batch of images (B, C, H, W) for latents "
                f"{tuple(z.shape)}; got "
                f"{type(x).__name__}{tuple(x.shape) if isinstance(x, Tensor) else ''}"
            )
        return x.clamp(-1.0, 1.0) if self.clamp else x

    def sample(
        self,
        count: int,
        generator: RandomSource = None,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        class_labels: Tensor | None = None,
    ) -> Tensor:
        z = self.latents(count, generator, device=device, dtype=dtype)
        return self.decode(z).to(device=device, dtype=dtype)

    def describe(self) -> dict[str, Any]:
        latent = None if self.latent_shape is None else list(self.latent_shape)
        return {**super().describe(), "latent_shape": latent}


class GaussianGenerator(LatentGenerator):
    """``x0' = mean + std * z``, ``z ~ N(0, I)`` of the image shape (the model's when not given).

    ``std = 1, mean = 0`` is *naive truncation*: ``x0' + sigma(T') eps ~ N(0, 1 + sigma^2)`` is, in the
    VP state ``x / sqrt(1 + sigma^2)``, exactly the pure noise ``N(0, I)`` of a full-length chain.
    """

    kind = "gaussian"

    def __init__(self, std: float = 1.0, mean: float = 0.0, image_shape: Sequence[int] | None = None) -> None:
        check_range("sampler.prior.std", std, low=0)
        self.std, self.mean = float(std), float(mean)
        shape = None if image_shape is None else tuple(int(s) for s in image_shape)
        nn.Module.__init__(self)  # not LatentGenerator's: the shape may come later, from the model (bind)
        self.fn = self._affine
        self.module = None
        self.clamp = False
        self.latent_shape = shape
        self.image_shape = shape

    def _affine(self, z: Tensor) -> Tensor:
        return self.mean + self.std * z

    def bind(self, shape: Sequence[int], setting: str = "sampler.prior") -> Generator:
        if self.image_shape is None:  # adopts the model's shape
            self.image_shape = self.latent_shape = tuple(int(s) for s in shape)
        return super().bind(shape, setting)

    def latents(self, count: int, generator: RandomSource = None, **kwargs: Any) -> Tensor:
        if self.latent_shape is None:
            fail("sampler.prior (gaussian) has no image shape yet; set sampler.prior.image_shape=[C,H,W]")
        return super().latents(count, generator, **kwargs)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "std": self.std, "mean": self.mean}


class MixtureGenerator(Generator):
    """Exact samples of an analytic :class:`~fastsample.models.gmm.GaussianMixture` (per seed).

    ``class_labels`` (from ``class_labels=cycle`` or a fixed class) restrict each sample to its
    class's components, so a class-conditional model gets a prior of the requested class.
    """

    kind = "mixture"

    def __init__(self, mixture: Any) -> None:
        super().__init__()
        if not (hasattr(mixture, "sample") and hasattr(mixture, "means")):
            fail(f"sampler.prior.mixture must be a GaussianMixture, got {type(mixture).__name__}")
        self.mixture = mixture
        self.image_shape = tuple(mixture.image_shape)

    def sample(
        self,
        count: int,
        generator: RandomSource = None,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        class_labels: Tensor | None = None,
    ) -> Tensor:
        labels = None if class_labels is None else class_labels.reshape(-1).cpu()
        generator = prior_streams(generator)
        if isinstance(generator, SeedNoise):
            if len(generator) != count:
                raise ValueError(f"{count} samples asked for but {len(generator)} seeds given")
            rows = [
                self.mixture.sample(1, stream, None if labels is None else labels[k : k + 1])[0]
                for k, stream in enumerate(generator.generators)
            ]
            images = torch.cat(rows)
        else:
            images = self.mixture.sample(count, generator, labels)[0]
        return images.to(device=device, dtype=dtype)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "components": int(self.mixture.means.shape[0])}


class NpzGenerator(Generator):
    """Pre-generated samples from a ``.npz``: ``images`` (or ``arr_0``), optional ``seeds``.

    uint8 ``(N, H, W, C)`` (``sample.py``'s ``samples.npz``) or float ``(N, C, H, W)`` in [-1, 1].
    Seed ``k`` takes the row whose ``seeds`` entry is ``k`` when the file has ``seeds``, else row ``k``;
    a seed without a row is an error (never a silent repeat). Without per-seed streams, rows are drawn
    uniformly at random.
    """

    kind = "npz"

    def __init__(self, path: str | os.PathLike, key: str | None = None) -> None:
        super().__init__()
        path = Path(str(path)).expanduser()
        setting = "sampler.prior.path"
        if not path.is_file():
            fail(
                f"{setting}={str(path)!r} does not exist; give a .npz of samples "
                "(e.g. sample.py's samples.npz)"
            )
        try:
            with np.load(path, allow_pickle=False) as data:
                files = list(data.files)
                keys = (key,) if key else SAMPLE_KEYS
                found = next((k for k in keys if k in files), None)
                if found is None:
                    fail(
                        f"{setting}={str(path)!r} has no {' or '.join(repr(k) for k in keys)} array "
                        f"(has: {', '.join(files) or 'nothing'}); expected images uint8 (N, H, W, C) "
                        "or float (N, C, H, W) in [-1, 1]"
                    )
                images = data[found]
                seeds = data["seeds"] if "seeds" in files else None
        except (OSError, ValueError) as err:
            fail(f"{setting}={str(path)!r} is not a readable .npz: {err}")
        check_image_batch(images, f"{setting}={str(path)!r}")
        if len(images) == 0:
            fail(f"{setting}={str(path)!r} holds no images")
        if images.dtype == np.uint8:
            tensor = from_uint8(images)
        else:
            tensor = torch.from_numpy(np.ascontiguousarray(images)).float()
            if float(tensor.min()) < -1.001 or float(tensor.max()) > 1.001:
                fail(
                    f"{setting}={str(path)!r}: float images must be in [-1, 1], got "
                    f"[{float(tensor.min()):.3g}, {float(tensor.max()):.3g}]"
                )
        self.path = str(path)
        self.register_buffer("images", tensor, persistent=False)
        self.image_shape = tuple(tensor.shape[1:])
        self.rows: dict[int, int] | None = None
        if seeds is not None:
            if len(seeds) != len(images):
                fail(f"{setting}={str(path)!r}: 'seeds' has {len(seeds)} entries for {len(images)} images")
            self.rows = {int(seed): row for row, seed in enumerate(seeds.tolist())}

    def row_of(self, seed: int) -> int:
        """The row of ``seed``; fails naming the file's range when there is none."""
        if self.rows is not None:
            if seed not in self.rows:
                known = sorted(self.rows)
                fail(
                    f"sampler.prior.path={self.path!r} has no sample for seed {seed} (its seeds: "
                    f"{known[0]}..{known[-1]}, {len(known)} of them); sample with seeds it holds"
                )
            return self.rows[seed]
        if not 0 <= seed < len(self.images):
            fail(
                f"sampler.prior.path={self.path!r} holds {len(self.images)} samples "
                f"(rows 0..{len(self.images) - 1}) "
                f"and no 'seeds' array, so seed {seed} has no sample; use seeds below {len(self.images)}"
            )
        return seed

    def sample(
        self,
        count: int,
        generator: RandomSource = None,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        class_labels: Tensor | None = None,
    ) -> Tensor:
        if isinstance(generator, SeedNoise):
            index = torch.tensor([self.row_of(seed) for seed in generator.seeds], dtype=torch.long)
        else:
            index = torch.randint(len(self.images), (count,), generator=generator)
        return self.images[index.to(self.images.device)].to(device=device, dtype=dtype)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "path": self.path, "samples": len(self.images)}


# -- constructors used by conf/prior ---------------------------------------------------------


def callable_generator(
    fn: Callable[[Tensor], Tensor],
    latent_shape: Sequence[int] | int,
    image_shape: Sequence[int] | None = None,
) -> LatentGenerator:
    """Any callable ``z -> x`` (an instantiated module, or a function via ``_partial_``)."""
    if isinstance(fn, nn.Module):
        fn = fn.eval().requires_grad_(False)
    return LatentGenerator(fn, latent_shape, image_shape)


def as_generator(prior: Any, setting: str = "sampler.prior") -> Generator:
    """A :class:`Generator` from a generator, a Hydra config, a GaussianMixture or a ``.npz`` path."""
    if isinstance(prior, Generator):
        return prior
    if prior is None:
        fail(
            f"{setting} is not set; choose a prior with generator@{setting}=vae|gmm|gaussian|npz|callable "
            "(conf/prior)"
        )
    if isinstance(prior, (dict, DictConfig)):
        return as_generator(instantiate(prior), setting)
    if isinstance(prior, (str, os.PathLike)) and str(prior).endswith(".npz"):
        return NpzGenerator(prior)
    if hasattr(prior, "sample") and hasattr(prior, "means"):
        return MixtureGenerator(prior)
    fail(f"{setting} must be a generator (conf/prior), got {type(prior).__name__}")


# -- control: latent and pixel edits ---------------------------------------------------------------


def interpolate_latents(z0: Tensor, z1: Tensor, count: int, mode: str = "slerp") -> Tensor:
    """``count`` latents from ``z0`` to ``z1`` (both included): spherical (Gaussian latents) or linear.

    ``z0`` / ``z1`` are single latents (any shape); the result is ``(count, *z0.shape)``.
    """
    check_choice("mode", mode, INTERPOLATIONS)
    check_range("count", count, low=2)
    weights = torch.linspace(0, 1, count, dtype=torch.float64)
    a, b = z0.double().flatten(), z1.double().flatten()
    if mode == "linear":
        path = (1 - weights)[:, None] * a + weights[:, None] * b
    else:
        cosine = (a @ b / (a.norm() * b.norm())).clamp(-1, 1)
        angle = torch.arccos(cosine)
        if float(angle) < 1e-6:
            path = (1 - weights)[:, None] * a + weights[:, None] * b
        else:
            path = (
                torch.sin((1 - weights) * angle)[:, None] * a + torch.sin(weights * angle)[:, None] * b
            ) / math.sin(float(angle))
    return path.reshape(count, *z0.shape).to(z0.dtype)


def box_mask(shape: Sequence[int], top: int, left: int, height: int, width: int) -> Tensor:
    """A ``(1, H, W)`` 0/1 mask, 1 inside the box (clipped to the image)."""
    _, rows, cols = shape
    for name, value, bound in (("top", top, rows), ("left", left, cols)):
        check_range(f"box.{name}", value, low=0, high=bound - 1)
    check_range("box.height", height, low=1)
    check_range("box.width", width, low=1)
    mask = torch.zeros(1, rows, cols)
    mask[:, top : top + height, left : left + width] = 1.0
    return mask


def mask_edit(base: Tensor, source: Tensor, mask: Tensor) -> Tensor:
    """``mask * source + (1 - mask) * base``: pixels of ``source`` where the mask is 1 (soft masks blend)."""
    if base.shape != source.shape:
        fail(f"mask edit: base {tuple(base.shape)} and source {tuple(source.shape)} differ in shape")
    mask = mask.to(base)
    return mask * source + (1 - mask) * base


def paste(base: Tensor, source: Tensor, top: int, left: int, height: int, width: int) -> Tensor:
    """``base`` with the box ``[top:top+height, left:left+width]`` taken from ``source``."""
    return mask_edit(base, source, box_mask(base.shape[-3:], top, left, height, width))
