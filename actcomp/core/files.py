"""Files that survive a kill or a full disk, loading that runs no code, output paths checked early.

A file is replaced atomically: its bytes go to ``NAME.tmp`` beside it, are flushed to the disk
(``fsync``), the temporary file is renamed over ``NAME`` (``os.replace``, atomic on POSIX and
Windows) and the directory is flushed so that the rename itself survives a power cut. A process
killed at any point leaves either the old file or the new one, never a mixture; a failed write
(disk full) removes the temporary file and leaves the old file as it was. ``torch.save`` files
are loaded with ``weights_only=True``: only tensors, numbers, strings and containers of them,
so a crafted file cannot run code.
"""

from __future__ import annotations

import errno
import io
import os
import pickle
import re
from pathlib import Path

import torch

_CHUNK_BYTES = 1 << 20
_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def temporary_path(path: str | Path) -> Path:
    """Where :func:`atomic_write` puts the bytes before the rename: ``NAME.tmp`` beside ``path``."""
    path = Path(path)
    return path.with_name(path.name + ".tmp")


def _fsync_directory(directory: Path) -> None:
    if os.name != "posix":  # pragma: no cover - Windows cannot open a directory for fsync
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, data: bytes | memoryview) -> Path:
    """Replace ``path`` by ``data`` so that a kill or a full disk never leaves a partial file.

    Writes ``NAME.tmp`` in chunks, fsyncs it, renames it over ``path`` and fsyncs the directory.
    On any failure the temporary file is removed and ``path`` keeps its old content; a full disk
    (ENOSPC, EDQUOT) raises ``OSError`` whose message starts with "disk full".
    """
    path = Path(path)
    tmp = temporary_path(path)
    view = memoryview(data).cast("B")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            done = 0
            while done < len(view):
                done += os.write(fd, view[done : done + _CHUNK_BYTES])
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if isinstance(error, OSError) and error.errno in _FULL:
            raise OSError(
                error.errno, f"disk full: could not write '{path}' ({len(view)} bytes); the previous file is left as it was"
            ) from None
        raise
    _fsync_directory(path.parent)
    return path


def atomic_torch_save(obj: object, path: str | Path) -> Path:
    """``torch.save(obj)`` into memory, then :func:`atomic_write` to ``path``."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write(path, buffer.getbuffer())


def atomic_write_text(path: str | Path, text: str) -> Path:
    """:func:`atomic_write` of ``text`` encoded as UTF-8."""
    return atomic_write(path, text.encode("utf-8"))


def load_plain(path: str | Path, what: str, map_location: str | torch.device | None = "cpu") -> object:
    """``torch.load(path, weights_only=True)``; every failure is a ValueError naming the file.

    A file that holds anything but tensors, numbers, strings and containers of them is refused
    before any of it runs (the unpickler never calls a global it was not given). ``what`` names
    the file's role in the message ("checkpoint", "weights file").
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} '{path}' does not exist or is not a file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if found or "Weights only load failed" in str(error):
            culprit = f"a reference to {found.group(1)}" if found else "an object that is not plain data"
            raise ValueError(
                f"{what} '{path}' refused: it holds {culprit}, which loading would run; only tensors, numbers, "
                "strings and containers of them are loaded (never load such a file from a source you do not trust)"
            ) from None
        raise ValueError(f"{what} '{path}' is corrupt or not a torch.save file ({_first_line(error)})") from None
    except Exception as error:  # torch.load raises RuntimeError, EOFError, KeyError, ... on damaged files
        raise ValueError(f"{what} '{path}' is truncated, corrupt or not a torch.save file ({_first_line(error)})") from None


def _first_line(error: BaseException) -> str:
    """``Type: first sentence of the message`` (torch's messages run on for several lines)."""
    text = str(error).strip()
    if not text:
        return type(error).__name__
    sentence = text.splitlines()[0].split(". ")[0]
    return f"{type(error).__name__}: {sentence[:160]}"


__all__ = [
    "atomic_torch_save",
    "atomic_write",
    "atomic_write_text",
    "load_plain",
    "temporary_path",
]
