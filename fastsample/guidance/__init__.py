"""Guidance: conditional functions ``g(x, sigma)`` added to the ODE, and denoiser wrappers (CFG).

``conf/guidance/*.yaml`` builds a :class:`GuidanceTask`;
:func:`fastsample.samplers.generation.generate_batch` calls its :meth:`~GuidanceTask.setup` per batch of
seeds. See docs/guidance.md.
"""

from fastsample.diffusion.denoiser import WrappedDenoiser
from fastsample.guidance.base import (
    ConditionalFunction,
    GuidanceBatch,
    GuidanceStats,
    GuidanceTask,
    GuidedRun,
    check_scale,
)
from fastsample.guidance.cfg import CFGDenoiser, ClassifierFreeGuidance
from fastsample.guidance.classifier import ClassifierGuidance, LogProbGuidance, MixturePosteriorGuidance
from fastsample.guidance.inverse import (
    Colorization,
    DataConsistency,
    Inpainting,
    InverseProblem,
    ProjectedDenoiser,
    SuperResolution,
)
from fastsample.guidance.operators import DownsampleOperator, GrayscaleOperator, LinearOperator, MaskOperator

__all__ = [
    "CFGDenoiser",
    "ClassifierFreeGuidance",
    "ClassifierGuidance",
    "Colorization",
    "ConditionalFunction",
    "DataConsistency",
    "DownsampleOperator",
    "GrayscaleOperator",
    "GuidanceBatch",
    "GuidanceStats",
    "GuidanceTask",
    "GuidedRun",
    "Inpainting",
    "InverseProblem",
    "LinearOperator",
    "LogProbGuidance",
    "MaskOperator",
    "MixturePosteriorGuidance",
    "ProjectedDenoiser",
    "SuperResolution",
    "WrappedDenoiser",
    "check_scale",
]
