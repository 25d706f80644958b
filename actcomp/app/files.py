"""Output paths of the command line, checked before any work is done."""

from __future__ import annotations

import tempfile
from pathlib import Path


def check_output_dir(path: str | Path, what: str = "--out") -> Path:
    """Create the directory ``path`` if needed and prove it writable, before any work is done.

    Raises ValueError when ``path`` is an existing file, cannot be created, or a file cannot be
    written in it (read-only file system, permissions).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} '{path}' is an existing file, not a directory; give a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise ValueError(f"{what} '{path}' is not a writable directory ({error.strerror or error})") from None
    return path


def check_output_file(path: str | Path, what: str = "--out") -> Path:
    """Check, before any work, that the file ``path`` can be written: not a directory, and its
    directory exists (or can be created) and is writable."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} '{path}' is a directory; give a file name")
    try:
        check_output_dir(path.parent, "its directory")
    except ValueError as error:
        raise ValueError(f"{what} '{path}' cannot be written: {error}") from None
    return path


__all__ = ["check_output_dir", "check_output_file"]
