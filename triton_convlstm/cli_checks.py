"""Checks the demo and bench commands make before any work, so that what would fail later (an
output folder that cannot be written, a missing optional package) is one line at the start.
Each command words its own message around the reason these return."""

from __future__ import annotations

import importlib
import os
import tempfile
from pathlib import Path


def one_line(exc: BaseException, limit: int = 200) -> str:
    """``Type: message`` on one line (whitespace collapsed), cut to ``limit`` characters."""
    text = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def unwritable(folder: Path) -> str | None:
    """Why files cannot be written in ``folder`` (created if need be; a trial file is written
    and removed), or None when they can."""
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
    """None when ``module`` imports; else "" when it (or its package) is not installed, or the
    error in one line when an installed one fails to import."""
    try:
        importlib.import_module(module)
    except ImportError as exc:
        absent = isinstance(exc, ModuleNotFoundError) and exc.name in (module.split(".")[0],
                                                                         module)
        return "" if absent else one_line(exc)
    return None
