"""diffusers interop, model side: diffusers folders as fastsample denoisers.

``model=diffusers`` loads a ``UNet2DModel`` with its scheduler config (the noise table and the
prediction type) from a folder written by diffusers' ``save_pretrained``: a pipeline layout
(``unet/`` + ``scheduler/``) or a bare UNet folder (``config.json`` + weights, with
``scheduler_config.json`` beside it or the schedule given as ``model.scheduler``). The UNet becomes a
:class:`~fastsample.diffusion.discrete.DiscreteVPDenoiser` on the scheduler's own ``alphas_cumprod``,
so sigma space and the UNet's integer timesteps correspond exactly.

``model=diffusers_t2i`` loads a Stable-Diffusion-style folder (``unet/`` UNet2DConditionModel,
``vae/`` AutoencoderKL, ``text_encoder/``, ``tokenizer/``, ``scheduler/``): a latent denoiser whose
condition is ``encoder_hidden_states`` (text embeddings; none: the empty prompt), with
:meth:`TextToImageDenoiser.encode_prompts` for ``guidance=prompt`` and
:meth:`TextToImageDenoiser.decode_latents` (the VAE) for the images.

diffusers and transformers are optional (``pip install fastsample[diffusers]``) and imported only
when a diffusers model or scheduler is built.
"""

from __future__ import annotations

import importlib
import inspect
import json
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from fastsample.diffusion.discrete import DiscreteSchedule, DiscreteVPDenoiser
from fastsample.utils.errors import check_choice, fail

INSTALL_HINT = "pip install fastsample[diffusers]"
#: diffusers' prediction types and ours
PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
#: diffusers schedulers that run on a discrete VP noise table (diffusers' KarrasDiffusionSchedulers
#: without EDMEulerScheduler, which expects an EDM-preconditioned network)
SCHEDULERS = (
    "DDIMScheduler",
    "DDPMScheduler",
    "DEISMultistepScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSDEScheduler",
    "DPMSolverSinglestepScheduler",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "HeunDiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "LMSDiscreteScheduler",
    "PNDMScheduler",
    "UniPCMultistepScheduler",
)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
WEIGHT_PATTERNS = ("diffusion_pytorch_model*.safetensors", "diffusion_pytorch_model*.bin")
T2I_PARTS = ("unet", "vae", "text_encoder", "tokenizer")


# -- optional dependencies ------------------------------------------------------------------------
def _require(module: str, what: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError:
        fail(
            f"{what} needs the optional package {module!r}, which is not installed; "
            f"install it with: {INSTALL_HINT}"
        )


def require_diffusers(what: str = "the diffusers interop") -> ModuleType:
    """The ``diffusers`` module, or a UserError naming the extra that installs it."""
    return _require("diffusers", what)


def require_transformers(what: str = "the diffusers interop") -> ModuleType:
    """The ``transformers`` module (text encoders, tokenizers), or a UserError naming the extra."""
    return _require("transformers", what)


def find_attribute(model: Any, name: str) -> Any:
    """``model.name``, looking through wrappers (``.inner`` of CFG / counting wrappers, ``.denoiser`` of
    a bound model); None when no layer has it."""
    seen: set[int] = set()
    while model is not None and id(model) not in seen:
        seen.add(id(model))
        try:
            return getattr(model, name)
        except AttributeError:
            model = getattr(model, "inner", None) or getattr(model, "denoiser", None)
    return None


# -- schedulers -------------------------------------------------------------------------------------
def scheduler_class(name: str, setting: str = "sampler.scheduler") -> type:
    """The diffusers scheduler class called ``name`` (one of :data:`SCHEDULERS`)."""
    if name not in SCHEDULERS:
        known = hasattr(require_diffusers(f"{setting}={name}"), str(name))
        reason = "runs on no discrete VP noise table" if known else "is not a diffusers scheduler class"
        fail(f"{setting}={name!r} {reason}; choose one of: {', '.join(SCHEDULERS)}")
    return getattr(require_diffusers(f"{setting}={name}"), name)


def scheduler_settings(cls: type) -> set[str]:
    """The constructor settings of a scheduler class."""
    return set(inspect.signature(cls.__init__).parameters) - {"self", "args", "kwargs"}


def build_scheduler(cls: type, config: dict[str, Any], setting: str) -> Any:
    """``cls`` built from ``config``: keys it does not take are dropped (a model's config may come from
    another scheduler class, as with diffusers' ``from_config``); refusals become one-line UserErrors."""
    allowed = scheduler_settings(cls)
    try:
        return cls(**{key: value for key, value in config.items() if key in allowed})
    except (ValueError, NotImplementedError, TypeError) as err:
        fail(f"{setting}: {cls.__name__} refused its settings: {_first_line(err)}")


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


def read_json(path: Path, setting: str) -> dict[str, Any]:
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        fail(f"{setting}: {path} is not a readable JSON file: {_first_line(err)}")
    if not isinstance(content, dict):
        fail(f"{setting}: {path} does not hold a JSON object")
    return content


def scheduler_config(
    root: Path, overrides: dict[str, Any] | None, setting: str = "model.path"
) -> dict[str, Any]:
    """The noise-schedule config of a diffusers folder (``scheduler/scheduler_config.json`` or
    ``scheduler_config.json``) updated with ``overrides`` (``model.scheduler``); one of them must exist."""
    overrides = dict(overrides or {})
    for candidate in (root / "scheduler" / "scheduler_config.json", root / "scheduler_config.json"):
        if candidate.is_file():
            return {**read_json(candidate, setting), **overrides}
    if not overrides:
        fail(
            f"{setting}={str(root)!r} has no scheduler config (scheduler/scheduler_config.json or "
            "scheduler_config.json); add one or give the noise schedule as model.scheduler="
            "{beta_schedule: linear, num_train_timesteps: 1000, prediction_type: epsilon}"
        )
    return overrides


def prediction_of(config: dict[str, Any], override: str | None, setting: str) -> str:
    """Our prediction name (eps / v / x0) for the scheduler config's ``prediction_type`` (or ``override``)."""
    kind = override if override is not None else config.get("prediction_type", "epsilon")
    if kind not in PREDICTION_TYPES:
        origin = "model.prediction_type" if override is not None else f"{setting}'s scheduler config"
        fail(
            f"{origin}: prediction_type={kind!r} is not supported; choose one of: "
            f"{', '.join(PREDICTION_TYPES)} (model.prediction_type overrides the config's)"
        )
    return PREDICTION_TYPES[kind]


def noise_table(config: dict[str, Any], setting: str) -> DiscreteSchedule:
    """The scheduler's own ``alphas_cumprod`` as a :class:`DiscreteSchedule` (the table diffusers uses)."""
    diffusers = require_diffusers(setting)
    name = config.get("_class_name")
    cls = getattr(diffusers, name) if name in SCHEDULERS else diffusers.DDPMScheduler
    table = {key: value for key, value in config.items() if key != "prediction_type"}
    scheduler = build_scheduler(cls, table, f"{setting} (scheduler config)")
    kind = (
        "trained_betas" if config.get("trained_betas") is not None else config.get("beta_schedule", "linear")
    )
    return DiscreteSchedule(str(kind), abar=scheduler.alphas_cumprod.double())


# -- folders ----------------------------------------------------------------------------------------
def check_folder(path: str | Path, setting: str = "model.path") -> Path:
    root = Path(path).expanduser()
    if not root.is_dir():
        fail(
            f"{setting}={str(path)!r} is not a folder; give a diffusers save_pretrained folder "
            "(pipeline layout with unet/ and scheduler/, or a bare UNet folder)"
        )
    return root


def component_folder(root: Path, names: Sequence[str], setting: str, what: str) -> Path:
    """The first of ``root / name`` holding ``config.json`` and weights, failing with what is missing."""
    for name in names:
        folder = root / name if name else root
        if (folder / "config.json").is_file():
            if not any(any(folder.glob(pattern)) for pattern in WEIGHT_PATTERNS):
                fail(
                    f"{setting}={str(root)!r}: {folder} has config.json but no weights "
                    "(diffusion_pytorch_model.safetensors or .bin)"
                )
            return folder
    places = " or ".join(f"{name}/config.json" if name else "config.json" for name in names)
    fail(f"{setting}={str(root)!r} has no {what}: expected {places}")


def load_component(cls: type, folder: Path, setting: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained(folder)`` offline, with loading errors as one-line UserErrors."""
    try:
        return cls.from_pretrained(str(folder), local_files_only=True, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        fail(f"{setting}: loading {cls.__name__} from {folder} failed: {_first_line(err)}")


def unet_class_name(folder: Path, setting: str) -> str:
    return str(read_json(folder / "config.json", setting).get("_class_name", "UNet2DModel"))


def torch_dtype(name: str) -> torch.dtype:
    check_choice("model.dtype", name, DTYPES)
    return DTYPES[name]


def sample_shape(size: int | Sequence[int]) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


# -- the denoisers ----------------------------------------------------------------------------------
class DiffusersNet(nn.Module):
    """``net(x_vp, t, class_labels, **cond)`` around a diffusers UNet, in the UNet's dtype.

    Learned-variance UNets predict twice the input channels; the first half is the mean prediction.
    """

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None, **cond: Any) -> Tensor:
        dtype = self.unet.dtype
        cond = {key: value.to(dtype) if value.is_floating_point() else value for key, value in cond.items()}
        if class_labels is not None:
            cond["class_labels"] = class_labels.long()
        out = self.unet(x.to(dtype), t, **cond, return_dict=False)[0]
        return out[:, : x.shape[1]]


class DiffusersDenoiser(DiscreteVPDenoiser):
    """A diffusers ``UNet2DModel`` on its scheduler's noise table, as ``D(x, sigma, class_labels=None)``.

    ``scheduler_config`` (the folder's) is what ``sampler=diffusers`` configures its schedulers with,
    so they see exactly this model's table and settings.
    """

    def __init__(
        self,
        unet: nn.Module,
        schedule: DiscreteSchedule,
        prediction: str,
        scheduler_config: dict[str, Any],
        *,
        timestep: str = "continuous",
        image_shape: tuple[int, ...] | None = None,
        num_classes: int | None = None,
        source: str = "",
    ) -> None:
        super().__init__(
            DiffusersNet(unet),
            schedule,
            prediction,
            timestep,
            image_shape=image_shape,
            num_classes=num_classes,
        )
        self.scheduler_config = dict(scheduler_config)
        self.source = source

    def net_output(self, x_vp: Tensor, t: Tensor, class_labels: Tensor | None = None, **_: Any) -> Tensor:
        if self.num_classes and class_labels is None:
            fail(
                f"the diffusers UNet at {self.source} is class-conditional ({self.num_classes} classes); "
                "set class_labels=cycle or a class index"
            )
        return self.net(x_vp, t, class_labels)

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "source": self.source, "unet": type(self.net.unet).__name__}


def load_unet(
    path: str,
    subfolder: str | None = None,
    scheduler: dict[str, Any] | None = None,
    prediction_type: str | None = None,
    timestep: str = "continuous",
    num_classes: int | None = None,
    dtype: str = "float32",
    variant: str | None = None,
) -> DiffusersDenoiser:
    """``conf/model/diffusers.yaml``: a diffusers ``UNet2DModel`` folder as a denoiser.

    Args:
        path: a ``save_pretrained`` folder: pipeline layout (``unet/``, ``scheduler/``) or a bare UNet.
        subfolder: the UNet's folder inside ``path`` (null: ``unet/`` if present, else ``path``).
        scheduler: noise-schedule settings updating the folder's scheduler config (``beta_schedule``,
            ``beta_start``, ``beta_end``, ``num_train_timesteps``, ``trained_betas``, ``prediction_type``).
        prediction_type: overrides the config's (epsilon | v_prediction | sample).
        timestep: how a sigma between table entries reaches the UNet: ``continuous`` (fractional) or
            ``nearest``.
        num_classes: classes of a class-conditional UNet (null: its ``num_class_embeds``).
        dtype: float32 | float16 | bfloat16 (the UNet's; samplers keep their own precision).
        variant: weights variant (e.g. ``fp16`` for ``diffusion_pytorch_model.fp16.safetensors``).
    """
    diffusers = require_diffusers("model=diffusers")
    root = check_folder(path)
    folder = component_folder(root, [subfolder] if subfolder else ["unet", ""], "model.path", "UNet")
    name = unet_class_name(folder, "model.path")
    if name == "UNet2DConditionModel":
        fail(
            f"model.path={str(path)!r} holds a text-conditional UNet2DConditionModel; use model=diffusers_t2i"
        )
    if name != "UNet2DModel":
        fail(f"model.path={str(path)!r} holds a {name}; model=diffusers loads a UNet2DModel")
    config = scheduler_config(root, scheduler)
    prediction = prediction_of(config, prediction_type, "model.path")
    schedule = noise_table(config, "model.path")
    unet = load_component(
        diffusers.UNet2DModel, folder, "model.path", torch_dtype=torch_dtype(dtype), variant=variant
    )
    unet.eval().requires_grad_(False)
    classes = num_classes if num_classes is not None else unet.config.num_class_embeds
    shape = (unet.config.in_channels, *sample_shape(unet.config.sample_size))
    return DiffusersDenoiser(
        unet,
        schedule,
        prediction,
        config,
        timestep=timestep,
        image_shape=shape,
        num_classes=int(classes) if classes else None,
        source=str(root),
    )


class TextToImageDenoiser(DiffusersDenoiser):
    """A Stable-Diffusion-style latent denoiser ``D(z, sigma, encoder_hidden_states=None)``.

    Without ``encoder_hidden_states`` it denoises for the empty prompt (the unconditional model).
    ``encode_prompts`` turns prompts into embeddings (what ``guidance=prompt`` passes), and
    ``decode_latents`` maps samples through the VAE to images in [-1, 1].
    """

    def __init__(
        self,
        unet: nn.Module,
        vae: nn.Module,
        text_encoder: nn.Module,
        tokenizer: Any,
        schedule: DiscreteSchedule,
        prediction: str,
        scheduler_config: dict[str, Any],
        *,
        latent_shape: tuple[int, ...],
        timestep: str = "continuous",
        source: str = "",
    ) -> None:
        super().__init__(
            unet,
            schedule,
            prediction,
            scheduler_config,
            timestep=timestep,
            image_shape=latent_shape,
            source=source,
        )
        self.vae, self.text_encoder, self.tokenizer = vae, text_encoder, tokenizer
        self.scaling_factor = float(getattr(vae.config, "scaling_factor", None) or 0.18215)
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)
        self._empty: Tensor | None = None

    def net_output(
        self, x_vp: Tensor, t: Tensor, encoder_hidden_states: Tensor | None = None, **_: Any
    ) -> Tensor:
        if encoder_hidden_states is None:
            encoder_hidden_states = self.empty_embedding().expand(len(x_vp), -1, -1)
        return self.net(x_vp, t, encoder_hidden_states=encoder_hidden_states.to(x_vp.device))

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        """Text embeddings ``(len(prompts), tokens, width)`` as the diffusers pipelines compute them."""
        device = next(self.text_encoder.parameters()).device
        tokens = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        return self.text_encoder(tokens.input_ids.to(device))[0]

    def empty_embedding(self) -> Tensor:
        """The empty prompt's embedding (cached: the text encoder runs once per device)."""
        device = next(self.text_encoder.parameters()).device
        if self._empty is None or self._empty.device != device:
            self._empty = self.encode_prompts([""])
        return self._empty

    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> Tensor:
        """Images in [-1, 1] from latent samples (the VAE decoder, in the VAE's dtype)."""
        scaled = latents / self.scaling_factor + self.shift_factor
        images = self.vae.decode(scaled.to(self.vae.dtype), return_dict=False)[0]
        return images.clamp(-1, 1).to(latents.dtype)

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "text_encoder": type(self.text_encoder).__name__}


def load_text_encoder(folder: Path, setting: str) -> nn.Module:
    """The text encoder of ``folder`` by its config's architecture (CLIPTextModel for Stable Diffusion)."""
    transformers = require_transformers("model=diffusers_t2i")
    architectures = read_json(folder / "config.json", setting).get("architectures") or ["CLIPTextModel"]
    cls = getattr(transformers, architectures[0], None)
    if cls is None:
        fail(f"{setting}: the text encoder's architecture {architectures[0]!r} is not in transformers")
    return load_component(cls, folder, setting)


def load_tokenizer(folder: Path, setting: str) -> Any:
    transformers = require_transformers("model=diffusers_t2i")
    if not folder.is_dir() or not any(folder.iterdir()):
        fail(
            f"{setting}={str(folder.parent)!r} has no tokenizer: expected tokenizer/ "
            "(vocab.json, merges.txt, ...)"
        )
    return load_component(transformers.AutoTokenizer, folder, setting)


def check_t2i_folder(root: Path) -> None:
    """Fail naming every missing part of a Stable-Diffusion-style folder."""
    missing = [f"{part}/" for part in T2I_PARTS if not (root / part).is_dir()]
    if missing:
        fail(
            f"model.path={str(root)!r} is not a Stable-Diffusion-style folder: missing {', '.join(missing)} "
            "(expected unet/, vae/, text_encoder/, tokenizer/ and scheduler/)"
        )


def load_text_to_image(
    path: str,
    scheduler: dict[str, Any] | None = None,
    prediction_type: str | None = None,
    timestep: str = "continuous",
    resolution: int | None = None,
    dtype: str = "float32",
    variant: str | None = None,
) -> TextToImageDenoiser:
    """``conf/model/diffusers_t2i.yaml``: a Stable-Diffusion-style pipeline folder as a latent denoiser.

    ``resolution`` is the image size in pixels (null: the UNet's ``sample_size`` times the VAE's
    downsampling factor, e.g. 512 for SD 1.5); the sampler works on latents of that size / factor.
    Other settings as in :func:`load_unet`.
    """
    diffusers = require_diffusers("model=diffusers_t2i")
    root = check_folder(path)
    check_t2i_folder(root)
    unet_folder = component_folder(root, ["unet"], "model.path", "UNet")
    vae_folder = component_folder(root, ["vae"], "model.path", "VAE")
    config = scheduler_config(root, scheduler)
    prediction = prediction_of(config, prediction_type, "model.path")
    schedule = noise_table(config, "model.path")
    weights = {"torch_dtype": torch_dtype(dtype), "variant": variant}
    unet = load_component(diffusers.UNet2DConditionModel, unet_folder, "model.path", **weights)
    vae = load_component(diffusers.AutoencoderKL, vae_folder, "model.path", **weights)
    text_encoder = load_text_encoder(root / "text_encoder", "model.path").to(torch_dtype(dtype))
    tokenizer = load_tokenizer(root / "tokenizer", "model.path")
    for module in (unet, vae, text_encoder):
        module.eval().requires_grad_(False)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    latent = sample_shape(unet.config.sample_size)
    if resolution is not None:
        if int(resolution) % factor:
            fail(
                f"model.resolution={resolution} must be a multiple of the VAE's downsampling factor {factor}"
            )
        latent = (int(resolution) // factor,) * 2
    return TextToImageDenoiser(
        unet,
        vae,
        text_encoder,
        tokenizer,
        schedule,
        prediction,
        config,
        latent_shape=(unet.config.in_channels, *latent),
        timestep=timestep,
        source=str(root),
    )
