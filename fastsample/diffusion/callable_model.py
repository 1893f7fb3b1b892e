"""Any callable ``model(x, sigma, **cond) -> x0`` as a model: the k-diffusion convention.

``conf/model/callable.yaml`` names the callable by a dotted path (``my_pkg.models.denoise`` or
``my_pkg.models:denoise``), or builds it with a nested ``_target_``. With ``kwargs`` the named object is
a factory (a class or a function) called with them to build the model, e.g. a network class and its
checkpoint path. The callable gets sigma-space states ``x = x0 + sigma * eps``, a ``(B,)`` sigma
tensor and the sampler's condition as keywords (``class_labels`` in class-conditional runs), and
returns its estimate of ``x0``; it is wrapped in :class:`~fastsample.diffusion.denoiser.FunctionDenoiser`
(an ``nn.Module`` callable becomes a submodule, so it moves with ``device=``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from hydra.utils import get_object

from fastsample.diffusion.denoiser import FunctionDenoiser
from fastsample.utils.errors import check_range, fail


def import_object(path: str, setting: str = "model.fn") -> Any:
    """The object at a dotted path: ``package.module.name`` or ``package.module:name``."""

    if not isinstance(path, str) or not path.strip():
        fail(f"{setting} must be a dotted path such as my_pkg.models.denoise, got {path!r}")
    try:
        return get_object(path.strip().replace(":", "."))
    except Exception as err:  # ImportError, AttributeError, ValueError, or the module's own import error
        reason = (str(err).strip() or type(err).__name__).splitlines()[0]
        fail(f"{setting}={path!r} cannot be imported: {reason}")


def load_callable(
    fn: str | Callable[..., Any],
    kwargs: dict[str, Any] | None = None,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    image_shape: Sequence[int] | None = None,
    num_classes: int | None = None,
) -> FunctionDenoiser:
    """``conf/model/callable.yaml``: the callable at ``fn`` (or built by ``fn(**kwargs)``) as a denoiser.

    Args:
        fn: a dotted path or the callable itself.
        kwargs: null: ``fn`` is the model; a mapping: ``fn`` is a factory called with it.
        sigma_min / sigma_max: the model's trained sigma range (where schedules start and end).
        image_shape: the data shape ``[C, H, W]`` (null: sample.py needs ``shape=``).
        num_classes: classes of a class-conditional model (it then receives ``class_labels``).
    """
    obj = import_object(fn) if isinstance(fn, str) else fn
    if kwargs is not None:
        if not callable(obj):
            fail(f"model.fn={fn!r} is not callable, so it cannot build the model from model.kwargs")
        obj = obj(**dict(kwargs))
    if not callable(obj):
        fail(f"model.fn={fn!r} gives a {type(obj).__name__}, which is not callable as model(x, sigma)")
    check_range("model.sigma_min", sigma_min, low=0, low_inclusive=False)
    if sigma_min >= sigma_max:
        fail(f"model.sigma_min={sigma_min} must be below model.sigma_max={sigma_max}")
    denoiser = FunctionDenoiser(obj, sigma_min=sigma_min, sigma_max=sigma_max, image_shape=image_shape)
    denoiser.num_classes = int(num_classes) if num_classes else None
    return denoiser
