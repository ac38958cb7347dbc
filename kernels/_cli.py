"""How every command-line tool of the project reports errors (``kernels.check``, ``bench.*``,
``train/run.py``, ``train.predict``): a mistake in the user's input (a path, a value, a file)
ends the command with one line, ``error: <what> (<which file>): <what to do>``, and exit status 2;
anything else is a bug and keeps its traceback. ``--debug`` anywhere on the command line shows
the traceback of user errors too.

It lives in the lowest package so that every floor (kernels <- minbert <- train <- bench) can
use it; it imports nothing heavy itself.
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

DEBUG_FLAG = "--debug"
USER_ERROR_STATUS = 2


class UserError(Exception):
    """Bad input from the user; the message names what is wrong, where, and what to do."""


# Besides UserError and its subclasses: the operating system's word on a path the user gave.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, FileNotFoundError, NotADirectoryError,
                                                IsADirectoryError, PermissionError)


def strip_debug(argv: Sequence[str]) -> tuple[list[str], bool]:
    """``argv`` without ``--debug``, and whether it was there."""
    rest = [a for a in argv if a != DEBUG_FLAG]
    return rest, len(rest) != len(argv)


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line (an OSError without its own text gets its strerror and
    file name)."""
    text = str(error)
    if isinstance(error, OSError) and error.filename is not None and str(error.filename) not in text:
        text = f"{error.strerror or text}: {error.filename}"
    return " ".join(part.strip() for part in text.splitlines() if part.strip()) or type(error).__name__


def run_cli(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None,
            prefix: str = "") -> int:
    """Run ``main(argv)`` (``argv`` without ``--debug``; default ``sys.argv[1:]``); a user error
    becomes one line on stderr and status 2 (re-raised with ``--debug``)."""
    args, debug = strip_debug(sys.argv[1:] if argv is None else argv)
    try:
        status = main(args)
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"{prefix}error: {one_line(e)}", file=sys.stderr, flush=True)
        return USER_ERROR_STATUS
    return 0 if status is None else int(status)
