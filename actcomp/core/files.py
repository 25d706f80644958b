"""Files that survive a kill or a full disk, loading that runs no code, one writer per directory.

A file is replaced atomically: its bytes go to a temporary file beside it whose name is this
writer's own (``NAME.<pid>.<random>.tmp``, so two writers never share one), are flushed to the
disk (``fsync``), the temporary file is renamed over ``NAME`` (``os.replace``, atomic on POSIX
and Windows) and the directory is flushed so that the rename itself survives a power cut. A
process killed at any point leaves either the old file or the new one, never a mixture; a
failed write (disk full) removes the temporary file and leaves the old file as it was.
``torch.save`` files are loaded with ``weights_only=True``: only tensors, numbers, strings and
containers of them, so a crafted file cannot run code.

A directory that one process writes as a whole (a fine-tuning run, a bundle) is claimed with
:class:`DirectoryLock`: the lock file ``.actcomp.lock`` is created with ``O_CREAT | O_EXCL``
(one process wins) and holds the writer's pid, host and start time; a second writer is refused
with :class:`Busy` naming the holder. A lock left by a process that died (its pid is no longer
alive on this host, or now belongs to a process started later) is taken over; on POSIX the
holder also keeps an ``flock`` on the file, which the kernel drops when the holder dies and
which serialises the take-over (two processes can never both break one stale lock).
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import re
import secrets
import socket
import sys
import time
import warnings
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

try:  # POSIX: the holder of a lock keeps an flock on it, which dies with the holder
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

_CHUNK_BYTES = 1 << 20
_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def temporary_path(path: str | Path) -> Path:
    """A fresh name for the bytes of ``path`` before the rename: ``NAME.<pid>.<random>.tmp``
    beside it, this writer's own (two writers of one file never write one temporary file)."""
    path = Path(path)
    return path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def temporaries(path: str | Path) -> list[Path]:
    """The temporary files of ``path`` that exist now: ones a writer is filling, or ones a
    killed writer left (``NAME.<pid>.<random>.tmp``, and ``NAME.tmp`` of older versions)."""
    path = Path(path)
    pattern = re.compile(re.escape(path.name) + r"(\.\d+\.[0-9a-f]+)?\.tmp")
    try:
        names = os.listdir(path.parent)
    except OSError:
        return []
    return sorted(path.parent / n for n in names if pattern.fullmatch(n))


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

    Writes :func:`temporary_path` in chunks, fsyncs it, renames it over ``path`` and fsyncs the directory.
    On any failure the temporary file is removed and ``path`` keeps its old content; a full disk
    (ENOSPC, EDQUOT) raises ``OSError`` whose message starts with "disk full".
    """
    path = Path(path)
    tmp = temporary_path(path)
    view = memoryview(data).cast("B")
    created = False
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)  # this writer's own name
        created = True
        try:
            done = 0
            while done < len(view):
                done += os.write(fd, view[done : done + _CHUNK_BYTES])
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as error:
        if created:
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
    import torch  # here, not at the top: the lock and the atomic writes need no torch

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
    the file's role in the message ("checkpoint", "weights file"). A file that is neither a zip
    archive (``torch.save``) nor a pickle (its legacy format) is refused as such before torch
    reads it; torch's warnings while reading are not printed (the error says what went wrong).
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} '{path}' does not exist or is not a file")
    if not _looks_like_torch_save(path):
        raise ValueError(f"{what} '{path}' is truncated, corrupt or not a torch.save file (neither a zip archive nor a pickle)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if found:
            raise ValueError(
                f"{what} '{path}' refused: it holds a reference to {found.group(1)}, which loading would run; only tensors, "
                "numbers, strings and containers of them are loaded (never load such a file from a source you do not trust)"
            ) from None
        # Anything else the weights-only unpickler stops at (an opcode or a protocol it does not
        # take, a damaged stream): nothing in the file ran; it is not a plain torch.save file.
        raise ValueError(
            f"{what} '{path}' is truncated, corrupt or not a torch.save file (the loader stopped at: {_unpickler_reason(error)}); "
            "nothing in it was run"
        ) from None
    except Exception as error:  # torch.load raises RuntimeError, EOFError, KeyError, ... on damaged files
        raise ValueError(f"{what} '{path}' is truncated, corrupt or not a torch.save file ({_first_line(error)})") from None


def _unpickler_reason(error: BaseException) -> str:
    """What the weights-only unpickler stopped at (``Unsupported operand 0``), without torch's
    preamble and advice; else the first line of the message."""
    text = str(error)
    found = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    if found:
        return found.group(1).strip().splitlines()[0][:160]
    return _first_line(error)


def _looks_like_torch_save(path: Path) -> bool:
    """A zip archive (``torch.save`` since torch 1.6) or a pickle (protocol 2 and up: the legacy format)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return True  # let torch.load report it
    if zipfile.is_zipfile(path):
        return True
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _first_line(error: BaseException) -> str:
    """``Type: first sentence of the message`` (torch's messages run on for several lines)."""
    text = str(error).strip()
    if not text:
        return type(error).__name__
    sentence = text.splitlines()[0].split(". ")[0]
    return f"{type(error).__name__}: {sentence[:160]}"

LOCK_NAME = ".actcomp.lock"
_UNFINISHED_LOCK_S = 10.0  # a lock file without a readable holder this old is a writer's that died creating it


class Busy(ValueError):
    """Another writer holds the directory (a ValueError: one line and exit code 2 on the command line)."""


def _process_start(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks after boot) of a process, from /proc (Linux); None elsewhere."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
        fields = text[text.rindex(")") + 2 :].split()
        return fields[0], int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int, start: int | None) -> bool:
    """Whether ``pid`` is a live process on this host, and the one that wrote the lock (a pid
    reused by a process started later is not). Outside POSIX this cannot be told safely: True."""
    if os.name != "posix":  # pragma: no cover - os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    except (OverflowError, OSError):
        return False
    found = _process_start(pid)
    if found is not None:
        state, started = found
        if state == "Z" or (start is not None and started != start):
            return False
    return True


def _holder(text: str) -> dict | None:
    """The holder a lock file names (pid > 0, host, start), or None when it is unreadable."""
    try:
        info = json.loads(text)
    except ValueError:
        return None
    if not isinstance(info, dict) or not isinstance(info.get("host"), str):
        return None
    pid = info.get("pid")
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return None
    return info


def _flock_briefly(fd, wait_s=0.5):
    """Take the flock of ``fd``, waiting up to ``wait_s`` for a process that breaks a stale lock
    (it holds the flock for an instant); True when taken, None when it stays held (its holder
    lives), False where the file system has no flock."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return None
            time.sleep(0.01)
        except OSError:
            return False


class DirectoryLock:
    """One writer per directory: ``with DirectoryLock(path, "run directory"): ...``.

    :meth:`acquire` creates ``path/.actcomp.lock`` with ``O_CREAT | O_EXCL`` holding this
    process's pid, host and start time (and keeps an ``flock`` on it on POSIX). When the file
    exists, its holder is checked: alive (or on another host, where that cannot be told) raises
    :class:`Busy` naming it; dead (its pid gone from this host, or reused by a later process)
    the stale lock is removed under an ``flock`` of its own (so two processes never both break
    it) and the claim retried. :meth:`release` removes the file only while it is still this
    lock's (a directory moved away with the lock inside leaves the new one alone).
    """

    def __init__(self, directory: str | Path, what: str = "directory", hint: str = "wait for it to finish or write elsewhere") -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.what, self.hint = what, hint
        self._fd: int | None = None

    def __enter__(self) -> "DirectoryLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _busy(self, info: dict | None) -> Busy:
        if info is None:
            holder = "a writer that is starting (its lock holds no holder yet)"
        else:
            holder = f"pid {info['pid']} on {info['host']}" + (f" since {info['started']}" if isinstance(info.get("started"), str) else "")
        here = info is None or info["host"] == socket.gethostname()
        tail = "" if here else f"; if that process is no longer running, delete {self.path}"
        return Busy(f"{self.what} '{self.directory}' is in use by another writer: {holder} (lock {self.path}); {self.hint}{tail}")

    def acquire(self) -> "DirectoryLock":
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this lock")
        found = _process_start(os.getpid())
        info = {
            "pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "pid_start": found[1] if found else None, "command": " ".join(sys.argv)[:300],
        }
        for _ in range(20):  # each round either claims the lock, raises Busy, or removed a stale lock
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self._break_stale()
                continue
            try:
                if fcntl is not None:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX)  # only a breaker checking this file can hold it, briefly
                    except OSError:
                        pass  # a file system without flock: the pid check alone
                os.write(fd, json.dumps(info).encode())  # not fsynced: after a power cut no holder is alive anyway
            except BaseException as error:
                os.close(fd)
                self.path.unlink(missing_ok=True)
                if isinstance(error, OSError) and error.errno in _FULL:
                    raise OSError(error.errno, f"disk full: could not write '{self.path}'") from None
                raise
            self._fd = fd
            return self
        raise self._busy(None)  # pragma: no cover - twenty stale locks in a row

    def _break_stale(self) -> None:
        """Raise Busy while the lock's holder lives; remove the lock when its holder is dead."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return  # released meanwhile: claim again
        try:
            if fcntl is not None and _flock_briefly(fd) is None:  # its holder keeps the flock: alive
                raise self._busy(_holder(os.read(fd, 1 << 16).decode("utf-8", "replace")))
            # This process now holds the file's flock (or the system has none): unless another
            # breaker removed it meanwhile, it stays the lock until we decide.
            status = os.fstat(fd)
            try:
                now = os.stat(self.path)
            except FileNotFoundError:
                return  # broken meanwhile: claim again
            if (now.st_dev, now.st_ino) != (status.st_dev, status.st_ino):
                return  # broken and claimed anew meanwhile: check the new holder
            info = _holder(os.read(fd, 1 << 16).decode("utf-8", "replace"))
            if info is None:
                if time.time() - status.st_mtime < _UNFINISHED_LOCK_S:
                    raise self._busy(None)
            elif info["host"] != socket.gethostname() or _alive(info["pid"], info.get("pid_start") if isinstance(info.get("pid_start"), int) else None):
                raise self._busy(info)
            os.unlink(self.path)  # stale: its holder died
        finally:
            os.close(fd)

    def release(self) -> None:
        """Remove the lock file if it is still this lock's; close it."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            mine = os.fstat(fd)
            now = os.stat(self.path)
            if (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino):
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)

    def detach(self) -> None:
        """Close the lock without removing its file (the directory holding it was moved away
        and is about to be deleted)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


__all__ = [
    "LOCK_NAME",
    "Busy",
    "DirectoryLock",
    "atomic_torch_save",
    "atomic_write",
    "atomic_write_text",
    "load_plain",
    "temporaries",
    "temporary_path",
]
