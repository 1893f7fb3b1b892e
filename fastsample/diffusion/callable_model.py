"""Any callable ``model(x, sigma, **cond) -> x0`` as a model: the k-diffusion convention.

``conf/model/callable.yaml`` names the callable by a dotted path (``my_pkg.models.denoise`` or
``my_pkg.models:denoise``), or builds it with a nested ``_target_``. With ``kwargs`` the named object is
a factory (a class or a function) called with them to build the model, e.g. a network class and its
checkpoint path. The callable gets sigma-space states ``x = x0 + sigma * eps``, a ``(B,)`` sigma
tensor and the sampler's condition as keywords (``class_labels`` in class-conditional runs), and
returns its estimate of ``x0``; it is wrapped in :class:`~fastsample.diffusion.denoiser.FunctionDenoiser`
(an ``nn.Module`` callable becomes a submodule, so it moves with ``device=``).

The module must be importable from where ``sample.py`` runs: installed, or its folder on ``PYTHONPATH``
(``PYTHONPATH=/path/to/code python sample.py model=callable model.fn=my_pkg.models.denoise ...``).
Mistakes are one-line errors naming the setting: a module that cannot be imported (with the reason),
a class named without ``model.kwargs`` (a class is a factory: ``model.kwargs={}`` builds it with no
arguments), a callable that does not take ``(x, sigma)`` or returns another shape than ``x``.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor

from fastsample.diffusion.denoiser import FunctionDenoiser
from fastsample.utils.errors import brief, check_range, fail

PYTHONPATH_HINT = "the module must be importable: install it, or add its folder to PYTHONPATH"


def import_object(path: str, setting: str = "model.fn") -> Any:
    """The object at a dotted path: ``package.module.name`` or ``package.module:name`` (class
    attributes too: ``package.module.Class.factory``). The longest importable module prefix is imported
    and the rest looked up on it, so the error names what is missing and why."""
    if not isinstance(path, str) or not path.strip():
        fail(f"{setting} must be a dotted path such as my_pkg.models.denoise, got {path!r}")
    parts = path.strip().replace(":", ".").split(".")
    module, error, found = None, None, 0
    for count in range(len(parts), 0, -1):
        name = ".".join(parts[:count])
        try:
            module, found = importlib.import_module(name), count
            break
        except ModuleNotFoundError as err:
            if err.name is not None and not name.startswith(err.name):  # a module it imports is missing
                fail(f"{setting}={path!r} cannot be imported: {brief(err)} (a module it imports is missing)")
            error = error or err
        except Exception as err:  # the module itself raised while importing
            fail(f"{setting}={path!r} cannot be imported: importing it raised {brief(err)}")
    if module is None:
        fail(f"{setting}={path!r} cannot be imported: {brief(error)}; {PYTHONPATH_HINT}")
    obj = module
    for attribute in parts[found:]:
        if not hasattr(obj, attribute):
            where = ".".join(parts[: parts.index(attribute)])
            fail(f"{setting}={path!r} cannot be imported: {where} has no attribute {attribute!r}")
        obj = getattr(obj, attribute)
    return obj


class CallableModel(FunctionDenoiser):
    """:class:`FunctionDenoiser` that checks the user's callable: a call that does not fit
    ``model(x, sigma, **cond)`` (a TypeError at the first call) and an output of another shape than
    ``x`` are UserErrors naming ``model.fn``, not a traceback from a solver's arithmetic."""

    def __init__(self, fn: Callable[..., Any], name: str, **settings: Any) -> None:
        super().__init__(fn, **settings)
        self.name, self.checked = name, False

    def denoise(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        if self.checked:
            return self.fn(x, sigma, **cond)
        try:
            out = self.fn(x, sigma, **cond)
        except TypeError as err:
            fail(
                f"model.fn={self.name} cannot be called as model(x, sigma{', **cond' if cond else ''}): "
                f"{brief(err)}; it must take the state and a (B,) sigma tensor and return x0"
            )
        if not isinstance(out, Tensor) or tuple(out.shape) != tuple(x.shape):
            got = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
            fail(
                f"model.fn={self.name} returned {got} for an input of shape {list(x.shape)}; it must "
                "return the x0 estimate, a tensor of the input's shape (check model.image_shape)"
            )
        self.checked = True
        return out

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "class": "FunctionDenoiser", "fn": self.name}


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
        kwargs: null: ``fn`` is the model; a mapping: ``fn`` is a factory called with it (``{}``: no
            arguments). A class without ``kwargs`` is refused: it would be called as the model.
        sigma_min / sigma_max: the model's trained sigma range (where schedules start and end).
        image_shape: the data shape ``[C, H, W]`` (null: the object's ``image_shape`` if it has one, else
            sample.py needs ``shape=``).
        num_classes: classes of a class-conditional model (it then receives ``class_labels``).
    """
    name = fn if isinstance(fn, str) else getattr(fn, "__qualname__", type(fn).__name__)
    obj = import_object(fn) if isinstance(fn, str) else fn
    if kwargs is not None:
        if not callable(obj):
            fail(f"model.fn={fn!r} is not callable, so it cannot build the model from model.kwargs")
        try:
            obj = obj(**dict(kwargs))
        except TypeError as err:
            fail(f"model.fn={name} cannot be built with model.kwargs={dict(kwargs)}: {brief(err)}")
    elif inspect.isclass(obj):
        fail(
            f"model.fn={name} is a class: give model.kwargs to build the model with it (model.kwargs={{}} "
            "for no arguments), or name a function or an instance"
        )
    if not callable(obj):
        fail(f"model.fn={fn!r} gives a {type(obj).__name__}, which is not callable as model(x, sigma)")
    check_range("model.sigma_min", sigma_min, low=0, low_inclusive=False)
    if sigma_min >= sigma_max:
        fail(f"model.sigma_min={sigma_min} must be below model.sigma_max={sigma_max}")
    if image_shape is None:  # a model object that declares its shape (a fastsample Denoiser) needs none
        image_shape = getattr(obj, "image_shape", None)
    denoiser = CallableModel(obj, name, sigma_min=sigma_min, sigma_max=sigma_max, image_shape=image_shape)
    denoiser.num_classes = int(num_classes) if num_classes else None
    return denoiser
