"""actcomp.core.files and actcomp.app.files: atomic replacement (kill, full disk), loading that runs no code, early output checks."""

import errno
import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from actcomp.app.files import check_output_dir, check_output_file
from actcomp.core.files import (
    LOCK_NAME,
    Busy,
    DirectoryLock,
    atomic_torch_save,
    atomic_write,
    load_plain,
    temporaries,
    temporary_path,
)

# The module alone, loaded from its file (without the package and torch: the processes start fast).
LOAD_FILES = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("files", {str(Path(__file__).resolve().parents[2] / "actcomp" / "core" / "files.py")!r})
files = importlib.util.module_from_spec(spec)
spec.loader.exec_module(files)
Busy, DirectoryLock = files.Busy, files.DirectoryLock
"""


class MakesMarker:
    """Unpickling this calls open(marker, "w"): the file appears if the loader runs code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write(path, b"old")
    atomic_write(path, bytes(range(256)) * 10_000)  # several chunks
    assert path.read_bytes() == bytes(range(256)) * 10_000
    assert not temporaries(path)


@pytest.mark.parametrize("fails", ["write", "fsync", "replace"])
def test_disk_full_keeps_the_old_file_and_removes_the_temporary(tmp_path, monkeypatch, fails):
    path = tmp_path / "checkpoint.pt"
    atomic_torch_save({"epoch": 1}, path)
    before = path.read_bytes()
    monkeypatch.setattr(os, fails, disk_full)
    with pytest.raises(OSError, match="disk full: could not write .*checkpoint.pt.*previous file is left as it was"):
        atomic_torch_save({"epoch": 2, "w": torch.randn(1000)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert not temporaries(path)
    assert torch.load(path, weights_only=True) == {"epoch": 1}


def test_other_failures_propagate_unchanged_and_clean_up(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError, match="I/O error"):
        atomic_write(path, b"data")
    assert not path.exists() and not temporaries(path)


def test_a_crafted_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": MakesMarker(marker)}, path)
    assert not marker.exists()
    with pytest.raises(ValueError, match=r"checkpoint '.*evil.pt' refused: it holds a reference to .*open, which loading would run"):
        load_plain(path, "checkpoint")
    assert not marker.exists()
    # The same payload as a plain pickle (not a torch.save zip) is refused too.
    with open(path, "wb") as f:
        pickle.dump({"payload": MakesMarker(marker)}, f, protocol=2)
    with pytest.raises(ValueError, match="refused"):
        load_plain(path, "checkpoint")
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncate", "empty", "junk"])
def test_damaged_files_are_one_clear_error(tmp_path, damage):
    path = tmp_path / "w.pt"
    torch.save({"w": torch.randn(100)}, path)
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "empty": b"", "junk": b"hello world" * 10}[damage])
    with pytest.raises(ValueError, match=r"weights file '.*w.pt' is truncated, corrupt or not a torch.save file \(\w+") as info:
        load_plain(path, "weights file")
    assert "\n" not in str(info.value)


def test_output_dir_checks(tmp_path):
    assert check_output_dir(tmp_path / "new" / "run").is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is an existing file, not a directory"):
        check_output_dir(tmp_path / "file")
    with pytest.raises(ValueError, match="is not a writable directory"):
        check_output_dir(tmp_path / "file" / "run")
    with pytest.raises(ValueError, match="is a directory; give a file name"):
        check_output_file(tmp_path)
    with pytest.raises(ValueError, match="plan.json' cannot be written: its directory '.*file' is an existing file"):
        check_output_file(tmp_path / "file" / "plan.json")
    assert check_output_file(tmp_path / "new2" / "plan.json").parent.is_dir()


def test_read_only_directory_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        try:
            (ro / "probe").write_text("x")
        except PermissionError:
            pass
        else:
            pytest.skip("this user (root) may write into a read-only directory")
        with pytest.raises(ValueError, match="'.*ro' is not a writable directory \\(Permission denied\\)"):
            check_output_dir(ro)
        with pytest.raises(ValueError, match="is not a writable directory"):
            check_output_dir(ro / "run")
    finally:
        ro.chmod(0o700)


def test_random_bytes_are_one_line_without_warnings_and_not_called_code(tmp_path, recwarn):
    """A file of random bytes is damaged, not a crafted one: the message says so in one line,
    and torch's warnings about what it read are not printed (issue 22, item 8)."""
    generator = torch.Generator().manual_seed(0)
    for i, head in enumerate([b"", b"\x80\xe3", b"\x80\x02"]):  # raw junk; a pickle protocol torch warns about; protocol 2
        path = tmp_path / f"random{i}.pt"
        path.write_bytes(head + bytes(torch.randint(0, 256, (4000,), generator=generator, dtype=torch.uint8).tolist()))
        with pytest.raises(ValueError, match=r"checkpoint '.*random\d.pt' is truncated, corrupt or not a torch.save file") as info:
            load_plain(path, "checkpoint")
        assert "\n" not in str(info.value) and "loading would run" not in str(info.value)
    assert not [w for w in recwarn if "torch" in str(w.filename)]


# --- One writer per directory: DirectoryLock. ---


def test_temporary_names_are_each_writers_own(tmp_path):
    path = tmp_path / "state.npz"
    names = {temporary_path(path) for _ in range(50)}
    assert len(names) == 50 and all(n.name.startswith("state.npz.") and n.name.endswith(".tmp") for n in names)
    (tmp_path / "state.npz.tmp").write_text("old style")  # older versions' name: still found as a leftover
    next(iter(names)).write_text("killed")
    assert len(temporaries(path)) == 2


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    with DirectoryLock(tmp_path, "run directory") as lock:
        held = json.loads((tmp_path / LOCK_NAME).read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname() and held["started"]
        with pytest.raises(Busy, match=rf"run directory '.*' is in use by another writer: pid {os.getpid()} on {socket.gethostname()} since "):
            DirectoryLock(tmp_path, "run directory").acquire()
        other = subprocess.run([sys.executable, "-c", LOAD_FILES + f"DirectoryLock({str(tmp_path)!r}, 'bundle').acquire()"], capture_output=True, text=True, check=False)
        assert other.returncode != 0 and f"in use by another writer: pid {os.getpid()}" in other.stderr
        assert lock.path.exists()
    assert not (tmp_path / LOCK_NAME).exists()  # released
    DirectoryLock(tmp_path).acquire().release()


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    code = LOAD_FILES + f"import os; DirectoryLock({str(tmp_path)!r}).acquire(); os._exit(0)"
    subprocess.run([sys.executable, "-c", code], check=True)  # dies holding it
    dead = json.loads((tmp_path / LOCK_NAME).read_text())
    assert dead["pid"] != os.getpid()
    with DirectoryLock(tmp_path):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    # A live pid that is not the holder (the pid was reused by a process started later) is stale too.
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "then", "pid_start": 1}))
    if sys.platform.startswith("linux"):
        with DirectoryLock(tmp_path):
            assert json.loads((tmp_path / LOCK_NAME).read_text())["started"] != "then"


def test_a_lock_of_another_host_or_a_live_process_is_never_broken(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 12345, "host": "elsewhere", "started": "2026-01-01"}))
    with pytest.raises(Busy, match=r"pid 12345 on elsewhere since 2026-01-01 .*; if that process is no longer running, delete .*\.actcomp\.lock"):
        DirectoryLock(tmp_path).acquire()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "started": "now"}))
    with pytest.raises(Busy, match=f"pid {os.getppid()} on"):
        DirectoryLock(tmp_path).acquire()
    (tmp_path / LOCK_NAME).write_text("")  # a writer between creating the file and filling it
    with pytest.raises(Busy, match="a writer that is starting"):
        DirectoryLock(tmp_path).acquire()


CONTENDER = LOAD_FILES + """
import os, time
directory, go, release = sys.argv[1:4]
print("ready", flush=True)
while not os.path.exists(go):
    pass
try:
    lock = DirectoryLock(directory).acquire()
except Busy:
    print("refused", flush=True)
else:
    print("won", flush=True)
    while not os.path.exists(release):
        time.sleep(0.01)
    lock.release()
"""


def test_processes_racing_for_a_stale_lock_leave_one_winner(tmp_path):
    """Eight processes try at once to claim a directory whose lock a dead process left: one
    takes it over, the others are refused naming it (none breaks the winner's fresh lock)."""
    directory, go, release = tmp_path / "run", tmp_path / "go", tmp_path / "release"
    directory.mkdir()
    subprocess.run([sys.executable, "-c", LOAD_FILES + f"import os; DirectoryLock({str(directory)!r}).acquire(); os._exit(0)"], check=True)
    children = [subprocess.Popen([sys.executable, "-c", CONTENDER, str(directory), str(go), str(release)], stdout=subprocess.PIPE, text=True) for _ in range(8)]
    try:
        assert [c.stdout.readline().strip() for c in children] == ["ready"] * 8  # imports done: they start together
        go.touch()
        results = sorted(c.stdout.readline().strip() for c in children)
        assert results == ["refused"] * 7 + ["won"], results
    finally:
        release.touch()
        for c in children:
            c.communicate(timeout=60)
    assert not (directory / LOCK_NAME).exists()


def test_release_leaves_a_lock_that_is_not_its_own(tmp_path):
    """A directory moved away with the lock inside (a bundle replaced by a new one): releasing
    the old lock must not remove the lock a new writer took in the new directory."""
    lock = DirectoryLock(tmp_path / "b")
    (tmp_path / "b").mkdir()
    lock.acquire()
    (tmp_path / "b").rename(tmp_path / "old")
    (tmp_path / "b").mkdir()
    with DirectoryLock(tmp_path / "b"):
        lock.release()
        assert (tmp_path / "b" / LOCK_NAME).exists()
