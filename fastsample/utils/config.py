"""Hydra helpers: instantiate without hiding our own user-facing errors."""

from __future__ import annotations

from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate as hydra_instantiate

from fastsample.utils.errors import UserError


def user_error_in(err: BaseException) -> UserError | None:
    """The :class:`UserError` that caused ``err`` (Hydra wraps errors of ``_target_`` calls), if any."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, UserError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def instantiate(config: Any, *args: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that re-raises a :class:`UserError` from inside as itself."""
    try:
        return hydra_instantiate(config, *args, **kwargs)
    except InstantiationException as err:
        cause = user_error_in(err)
        if cause is not None:
            raise cause from None
        raise
