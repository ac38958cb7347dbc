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
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

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


def check_writable(path: str | Path, what: str) -> None:
    """``path`` is, or can become, a directory this process can write in (tried, not guessed: a
    read-only mount or a missing permission fails here, before any work); else a UserError
    naming ``what`` (e.g. "--out")."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} is a file, not a directory: give a directory")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{what} {path} cannot be created: {probe} is a file")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise UserError(f"{what} {path} is not writable ({e.strerror or e} in {probe}): choose "
                        "another path") from None


def check_output_file(path: str | Path | None, what: str) -> None:
    """An output file ``path`` (None: none asked for) can be written: not a directory, and its
    directory writable."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a directory: give a file name")
    check_writable(path.parent, f"{what} {path}: the directory")
