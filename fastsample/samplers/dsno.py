"""``sampler=dsno``: sample with a trained DSNO operator (or KD student) in one network evaluation.

:class:`DSNOSampler` is used where a :class:`~fastsample.samplers.Sampler` is (``sample.py``,
``evaluate.py mode=generate``, the benchmarks): ``sample(model, noise, cond=...)`` starts at
``sigma_0 * noise`` and returns the operator's last frame (sigma = 0). ``model`` is not called; it is
checked to be the teacher the operator was distilled from (weights fingerprint), so a FID row never
pairs an operator with the wrong model's label set or shape. Guidance cannot be applied (there are no
solver steps to add it to) and is refused. Like every sampler it runs through
:class:`~fastsample.samplers.base.BaseSampler`: a non-finite output is a NumericalError.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import Tensor

from fastsample.diffusion.denoiser import CountingDenoiser
from fastsample.diffusion.schedules import ScheduleSpec
from fastsample.models.dsno import fingerprint, load_operator
from fastsample.samplers.base import BaseSampler
from fastsample.samplers.common import Callback, GuidanceFn
from fastsample.utils.errors import fail


class DSNOSampler(BaseSampler):
    """A trained operator as a sampler: NFE = 1 (one forward of the operator network per batch).

    Args:
        path: a DSNO bundle (``model.pt`` of ``train.py task=dsno``) or a ``task=dsno`` checkpoint.
        M: null, or the number of output times the operator must have (checked against the file).
        check_model: refuse a ``model`` whose weights are not the operator's teacher's.
    """

    name = "dsno"

    def __init__(self, path: str | os.PathLike, M: int | None = None, check_model: bool = True) -> None:
        self.operator, self.record = load_operator(path)
        frames = self.operator.frames
        if M is not None and int(M) != frames:
            fail(
                f"sampler.M={M} but the operator at sampler.path={str(path)!r} was trained with M={frames} "
                f"output times (mode {self.record['mode']}); use sampler.M=null or {frames}"
            )
        self.path, self.check_model = str(path), bool(check_model)
        self.steps = 1
        start = float(self.operator.sigmas[0])
        self.schedule = ScheduleSpec(kind="explicit", sigmas=[start, 0.0])
        self.knobs = {"path": self.path, "mode": self.record["mode"], "M": frames}
        self._checked: set[int] = set()

    @property
    def nfe(self) -> int:
        """Network evaluations per batch: the operator runs once on all its output times."""
        return 1

    @property
    def calls(self) -> int:
        """Operator forwards made so far (counted by the operator itself)."""
        return self.operator.calls

    def sigmas(self, model: Any = None) -> Tensor:
        """``[sigma_0, 0]``: where the operator starts and ends."""
        return torch.tensor([float(self.operator.sigmas[0]), 0.0], dtype=torch.float64)

    def check_teacher(self, model: Any) -> None:
        """Fail unless ``model`` is the teacher of the operator (same data shape and weights)."""
        while isinstance(model, CountingDenoiser):
            model = model.inner
        if not self.check_model or model is None or id(model) in self._checked:
            return
        teacher = self.record.get("teacher") or {}
        shape = getattr(model, "image_shape", None)
        if shape is not None and tuple(shape) != tuple(self.operator.input_shape):
            fail(
                f"sampler=dsno makes {tuple(self.operator.input_shape)} samples but the model's data "
                f"shape is {tuple(shape)}; pass the operator's teacher as model"
            )
        if teacher.get("fingerprint") and isinstance(model, torch.nn.Module):
            own = fingerprint(model)
            if own != teacher["fingerprint"]:
                identity = model.identity() if hasattr(model, "identity") else type(model).__name__
                fail(
                    f"the operator at sampler.path={self.path!r} was distilled from "
                    f"{teacher.get('identity')} (weights {teacher['fingerprint']}), but the model is "
                    f"{identity} (weights {own}); pass "
                    "that teacher as model (e.g. model=unet_fmnist) or set sampler.check_model=false"
                )
        self._checked.add(id(model))

    # -- the hooks of BaseSampler -------------------------------------------------------------------
    def _sampling_sigmas(self, denoiser: Any, sigmas: Tensor | None) -> Tensor:
        # the operator was trained from sigma_0 only: a configured schedule does not apply to it
        return self.sigmas(denoiser)

    def _integrate(
        self,
        denoiser: Any,
        x: Tensor,
        sigmas: Tensor,
        *,
        cond: dict | None,
        guidance: GuidanceFn | None,
        generator: Any,
        callback: Callback,
    ) -> Tensor:
        """The operator's final frame from ``x`` at ``sigma_0`` (``model`` is only checked, not called)."""
        if guidance is not None:
            fail(
                "sampler=dsno generates in one network evaluation and cannot apply guidance; "
                "use guidance=none"
            )
        start = float(self.operator.sigmas[0])
        if (
            len(sigmas) != 2
            or float(sigmas[-1]) != 0
            or not math.isclose(float(sigmas[0]), start, rel_tol=1e-6)
        ):
            fail(
                f"sampler=dsno runs from its operator's sigma_0 = {start:.6g} to 0 only, not on another grid"
            )
        self.check_teacher(denoiser)
        labels = (cond or {}).get("class_labels")
        operator = self.operator.to(x.device)
        dtype = next(operator.parameters()).dtype
        out = operator(x.to(dtype), labels)[:, -1].to(x.dtype)
        callback({"i": 0, "sigma": start, "sigma_next": 0.0, "x": out, "denoised": out})
        return out

    def __repr__(self) -> str:
        return (
            f"DSNOSampler(path={self.path!r}, mode={self.record['mode']!r}, M={self.operator.frames}, nfe=1)"
        )


def load_dsno(path: str | os.PathLike, M: int | None = None, check_model: bool = True) -> DSNOSampler:
    """``conf/sampler/dsno.yaml``: a trained operator as a one-evaluation sampler."""
    return DSNOSampler(path, M=M, check_model=check_model)
