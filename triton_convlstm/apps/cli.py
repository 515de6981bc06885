"""What the demo and bench commands share: a parser whose errors are one line (exit status 2),
and the checks they make before any work, so that what would fail later (an output folder that
cannot be written, a missing optional package, an unreadable JSON file) is one line at the
start. Each command words its own message around the reason these return."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import tempfile
from pathlib import Path
from typing import NoReturn


def one_line(exc: BaseException, limit: int = 200) -> str:
    """``Type: message`` on one line (whitespace collapsed), cut to ``limit`` characters.

    Args:
        exc: the exception to describe.
        limit: the most characters returned; a longer text ends in "...".

    Returns:
        ``Type: message``, or just ``Type`` when the message is empty.
    """
    text = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def unwritable(folder: Path) -> str | None:
    """Why files cannot be written in ``folder``.

    Args:
        folder: the folder, created (with its parents) if need be; a trial file is written in it
            and removed.

    Returns:
        The reason (the OS error's text, or "exists and is not a folder"), or None when files
        can be written there.
    """
    if folder.exists() and not folder.is_dir():
        return "exists and is not a folder"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, trial = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        os.close(fd)
        os.unlink(trial)
    except OSError as exc:
        return exc.strerror or one_line(exc)
    return None


def import_failure(module: str) -> str | None:
    """Whether ``module`` imports, without letting an ImportError out.

    Args:
        module: dotted module name, e.g. "matplotlib.figure".

    Returns:
        None when ``module`` imports; "" when it (or its top-level package) is not installed;
        the error in one line (:func:`one_line`) when an installed one fails to import.
    """
    try:
        importlib.import_module(module)
    except ImportError as exc:
        absent = isinstance(exc, ModuleNotFoundError) and exc.name in (module.split(".")[0],
                                                                         module)
        return "" if absent else one_line(exc)
    return None


class UsageError(Exception):
    """A bad argument: reported as one line, exit status 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad argument raises :class:`UsageError` (argparse would print the
    whole usage and exit the process itself)."""

    def error(self, message: str) -> NoReturn:
        """Raise instead of printing the usage and exiting.

        Args:
            message: argparse's description of the bad argument.

        Raises:
            UsageError: always, with ``message``.
        """
        raise UsageError(message)


def read_json(path: str | os.PathLike[str]) -> object:
    """A JSON file's content.

    Args:
        path: the file.

    Returns:
        The parsed content (any JSON value).

    Raises:
        UsageError: naming the file, if it cannot be read or parsed.
    """
    try:
        return json.loads(Path(path).read_text())
    except OSError as exc:
        raise UsageError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: not a JSON file ({exc})") from None
