"""User-facing errors: one clear line, a non-zero exit, no traceback unless asked.

Code anywhere in the package raises :class:`UserError` (or a subclass) for bad input: an unknown
option, an invalid number, a missing file. The entry points catch it in :func:`run_cli`, print
``error: <message>`` on stderr and exit with ``exit_code``. ``FASTSAMPLE_DEBUG=1`` re-raises so the
traceback is shown.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any, NoReturn


class UserError(Exception):
    """Bad input from the user; the message names the setting and what is allowed."""

    exit_code = 2


class NumericalError(UserError):
    """A model or sampler produced non-finite values."""

    exit_code = 3


def fail(message: str) -> NoReturn:
    """Raise a :class:`UserError` with ``message``."""
    raise UserError(message)


def brief(error: BaseException) -> str:
    """``Type: first sentence`` of an exception from a library (torch appends paragraphs of advice)."""
    text = str(error).strip()
    first = text.splitlines()[0].split(". ")[0].rstrip(".") if text else ""
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def check_choice(setting: str, value: Any, allowed: Iterable[Any]) -> None:
    """Fail unless ``value`` is one of ``allowed``, naming the setting and the choices."""
    allowed = list(allowed)
    if value not in allowed:
        fail(f"{setting}={value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}")


def check_range(
    setting: str,
    value: float,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> None:
    """Fail unless ``low <= value <= high`` (inclusivity configurable), naming the setting."""
    ok = True
    if low is not None:
        ok &= value >= low if low_inclusive else value > low
    if high is not None:
        ok &= value <= high if high_inclusive else value < high
    if not ok:
        lo = "-inf" if low is None else f"{low}"
        hi = "inf" if high is None else f"{high}"
        interval = f"{'[' if low_inclusive else '('}{lo}, {hi}{']' if high_inclusive else ')'}"
        fail(f"{setting}={value!r} is out of range; allowed: {interval}")


def run_cli(main: Callable[[], Any]) -> Any:
    """Run an entry point, turning :class:`UserError` (and a full disk met by library code, e.g. a
    Lightning log) into one stderr line and its exit code."""
    try:
        return main()
    except Exception as err:
        cause = find_user_error(err) or _disk_full(err)
        if cause is None or os.environ.get("FASTSAMPLE_DEBUG"):
            raise
        print(f"error: {cause}", file=sys.stderr)
        sys.exit(cause.exit_code)


def _disk_full(error: BaseException | None) -> UserError | None:
    """A UserError for the first out-of-space OSError in ``error``'s chain (writes we do not own)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError) and (found := disk_full_error(error, None)) is not None:
            return found
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


#: errno values of a full disk or quota: a user error naming the file, not a traceback
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def find_user_error(error: BaseException | None) -> UserError | None:
    """The first :class:`UserError` in ``error``'s ``__cause__`` / ``__context__`` chain, or None."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, UserError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def disk_full_error(error: OSError, path: str | os.PathLike | None) -> UserError | None:
    """The one-line UserError for an out-of-space write of ``path``, or None for other errors."""
    if error.errno not in DISK_FULL_ERRNOS:
        return None
    where = str(path) if path is not None else (error.filename or "an output file")
    return UserError(
        f"cannot write {where}: {os.strerror(error.errno)} ({errno.errorcode[error.errno]}); free space "
        "on that disk or write to another folder (output_dir=...); finished parts are kept, so rerunning "
        "the same command resumes"
    )
