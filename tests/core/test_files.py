"""actcomp.core.files and actcomp.app.files: atomic replacement (kill, full disk), loading that runs no code, early output checks."""

import errno
import os
import pickle

import pytest
import torch

from actcomp.app.files import check_output_dir, check_output_file
from actcomp.core.files import (
    atomic_torch_save,
    atomic_write,
    load_plain,
    temporary_path,
)


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
    assert not temporary_path(path).exists()


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
    assert not temporary_path(path).exists()
    assert torch.load(path, weights_only=True) == {"epoch": 1}


def test_other_failures_propagate_unchanged_and_clean_up(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError, match="I/O error"):
        atomic_write(path, b"data")
    assert not path.exists() and not temporary_path(path).exists()


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
