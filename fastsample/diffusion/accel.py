"""Speed options for the network at sampling time: mixed precision, channels_last, ``torch.compile``.

Only the network call changes. The solver state, the sigma grid and every solver update stay in the
run's ``precision`` (float32 / float64): :class:`NetworkWrapper` runs the denoiser under
``torch.autocast`` and casts its output back to the state's dtype, so a bfloat16 network cannot round
the few-step solvers' state (whose errors would compound over the steps). Autocast only lowers the
ops on its list (convolutions, matmuls, attention); the preconditioning / parametrization arithmetic
of the denoiser wrappers (EDM, discrete VP) is elementwise and stays in float32, and float64 tensors
(the analytic mixtures) are never lowered.

- ``network_precision``: ``float32`` (off) | ``bfloat16`` | ``float16`` (both run on the CPU too,
  slowly; on GPUs they use the tensor cores);
- ``channels_last``: NHWC weights and inputs for convolutional networks (faster convolutions on
  tensor cores, no effect on other layouts); outputs come back in the standard layout;
- ``compile``: ``torch.compile`` of the denoiser in place (``compile_mode=reduce-overhead`` also
  captures CUDA graphs of the network call; see docs/ecosystem.md for why the solver loop itself is
  not graph-captured).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fastsample.diffusion.denoiser import WrappedDenoiser
from fastsample.utils.errors import check_choice

NETWORK_PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class NetworkOptions:
    """The network settings of ``conf/sample.yaml`` / ``conf/evaluate.yaml`` (same names)."""

    network_precision: str = "float32"
    channels_last: bool = False
    compile: bool = False
    compile_mode: str = "default"
    compile_backend: str = "inductor"

    def __post_init__(self) -> None:
        check_choice("network_precision", self.network_precision, tuple(NETWORK_PRECISIONS))
        check_choice("compile_mode", self.compile_mode, COMPILE_MODES)

    @classmethod
    def from_config(cls, cfg: Any) -> NetworkOptions:
        """The options of a job config; missing keys keep their defaults (older configs, benchmarks)."""
        defaults = cls()
        return cls(**{name: cfg.get(name, value) for name, value in asdict(defaults).items()})

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype, or ``None`` for full precision."""
        return NETWORK_PRECISIONS[self.network_precision]

    def describe(self) -> dict[str, Any]:
        """The settings that differ from the defaults (recorded in run.json as ``network``)."""
        defaults = asdict(NetworkOptions())
        return {name: value for name, value in asdict(self).items() if value != defaults[name]}


class NetworkWrapper(WrappedDenoiser):
    """Calls a denoiser under autocast and / or in channels_last; returns its output like the state.

    Attributes the samplers and guidance read (sigma range, shape, classes) are copied; any other
    attribute (an analytic mixture's ``sample``, ``log_prob``...) is looked up on the wrapped model.
    """

    def __init__(self, inner: nn.Module, autocast_dtype: torch.dtype | None, channels_last: bool) -> None:
        super().__init__(inner)
        self.autocast_dtype = autocast_dtype
        self.channels_last = channels_last

    def forward(self, x: Tensor, sigma: Tensor | float, **cond: Any) -> Tensor:
        inputs = x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.ndim == 4 else x
        with torch.autocast(
            x.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None
        ):
            out = self.inner(inputs, sigma, **cond)
        # The state's dtype and the standard layout: solver updates stay in full precision.
        return out.to(x.dtype).contiguous()

    def identity(self) -> dict[str, Any]:
        """The wrapped model's identity: speed options do not make another model (schedule files match)."""
        return (
            self.inner.identity() if hasattr(self.inner, "identity") else {"class": type(self.inner).__name__}
        )

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "inner":
                raise
            return getattr(self.inner, name)


def apply_network_options(model: nn.Module, options: NetworkOptions) -> nn.Module:
    """``model`` with ``options`` applied (the same object when they are all off).

    channels_last converts the 4-D weights in place; compile compiles the denoiser's forward in place
    (``nn.Module.compile``, so the object and its attributes stay what they were); precision and
    channels_last inputs need the wrapper around the call.
    """
    if options.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if options.compile:
        settings = {"mode": options.compile_mode} if options.compile_backend == "inductor" else {}
        model.compile(backend=options.compile_backend, **settings)
    if options.autocast_dtype is not None or options.channels_last:
        model = NetworkWrapper(model, options.autocast_dtype, options.channels_last)
    described = options.describe()
    if described:
        object.__setattr__(model, "network_options", described)  # a plain attribute, not a submodule
    return model
