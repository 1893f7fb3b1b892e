"""Hydra instantiation that keeps :class:`UserError` a UserError.

``hydra.utils.instantiate`` wraps every exception raised by a ``_target_`` in an
``InstantiationException``, so a clear "dataset.name='foo' is not allowed" would surface as a
traceback of Hydra internals. :func:`instantiate` re-raises the original UserError instead;
:func:`find_user_error` digs one out of any exception chain (for entry points and tests).
"""

from __future__ import annotations

from typing import Any

import hydra.utils
from omegaconf.errors import MissingMandatoryValue

from fastsample.utils.errors import UserError, find_user_error


def instantiate(config: Any, *args: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``, but a UserError raised while building is re-raised unwrapped, and a
    required setting left at ``???`` becomes a UserError naming it."""
    try:
        return hydra.utils.instantiate(config, *args, **kwargs)
    except UserError:
        raise
    except MissingMandatoryValue as err:
        key = getattr(err, "full_key", None) or "a setting"
        raise UserError(f"{key} is required and has no value (???); set it, e.g. {key}=...") from None
    except Exception as err:
        user_error = find_user_error(err)
        if user_error is None:
            raise
        raise user_error from None


def instantiate_group(node: Any, **overrides: Any) -> list[Any]:
    """Instantiate every entry of a dict-of-configs group (callbacks, logger); skips null entries.

    ``overrides`` replace settings of every entry that has them (the sweep callback points the loggers'
    ``save_dir`` at the sweep directory); entries without a setting ignore it.
    """
    built = []
    for entry in (node or {}).values():
        if entry is None or "_target_" not in entry:
            continue
        built.append(instantiate(entry, **{key: value for key, value in overrides.items() if key in entry}))
    return built
