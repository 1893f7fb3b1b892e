"""Third-party console noise, silenced in one place (:func:`quiet_third_party`, called by the entry points).

What a run prints should be ours: progress bars, our log lines, results. Lightning and W&B add lines a
user can do nothing about on every run (tips for other products, deprecations inside Lightning
itself, "TPU available: False"). Each filter below names one such message; anything else, including
every warning about the user's own settings, still shows. ``FASTSAMPLE_VERBOSE=1`` turns the filters off.
"""

from __future__ import annotations

import logging
import os
import warnings

#: Python warnings raised inside third-party code that concern that code, not the user's run
NOISY_WARNINGS = (
    # torch deprecates a pytree check that Lightning still uses (pytorch_lightning/utilities/_pytree.py)
    r".*isinstance\(treespec, LeafSpec\)",
    # a short run (the quick tour) has fewer batches per epoch than Lightning's logging interval
    r"The number of training batches .* is smaller than the logging interval",
    # our data modules default to num_workers=0 on purpose (2-core machines, deterministic order)
    r"The '\w+_dataloader' does not have many workers",
)

#: Lightning's INFO lines that advertise other products or report hardware that is absent
NOISY_LOG_PREFIXES = ("💡 Tip", "GPU available: False", "TPU available: False", "HPU available: False")

#: the loggers Lightning prints its rank-zero messages through
LIGHTNING_LOGGERS = ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero")

#: W&B warns about a setting Lightning's WandbLogger always passes (``anonymous=None``)
WANDB_NOISE = ("The anonymous setting has no effect and will be removed in a future version.",)


class DropMessages(logging.Filter):
    """Drops log records whose message starts with one of ``prefixes``."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.prefixes)


def verbose() -> bool:
    """``FASTSAMPLE_VERBOSE=1``: show third-party output unfiltered (debugging Lightning or W&B)."""
    return os.environ.get("FASTSAMPLE_VERBOSE", "") not in ("", "0", "false")


def quiet_third_party() -> None:
    """Install the filters: warnings by message, Lightning's tips by log prefix. Idempotent and cheap
    (no third-party import), so every entry point calls it first."""
    if verbose():
        return
    for pattern in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(existing, DropMessages) for existing in logger.filters):
            logger.addFilter(DropMessages(NOISY_LOG_PREFIXES))


def quiet_wandb() -> None:
    """Mark W&B's known-noise warnings as already shown (W&B prints a ``repeat=False`` message once).

    Called where a W&B logger is built (importing wandb up front would cost every run ~0.4 s). W&B's
    own notes (offline run, where it is saved, ``wandb sync``) still print.
    """
    if verbose():
        return
    try:
        from wandb.errors import term
    except ImportError:  # W&B is an optional extra
        return
    shown = getattr(term, "_printed_messages", None)
    prefix = getattr(term, "WARN_STRING", None)
    if isinstance(shown, set) and isinstance(prefix, str):  # another W&B version: its warning shows, once
        shown.update(f"{prefix} {message}" for message in WANDB_NOISE)
