"""export_bundle writes a bundle as a whole (a new directory, then a swap), holds the bundle's
lock while it does, never replaces a trained bundle without overwrite=True, and ships no file
that nothing references (issue 22, items 2 and 8)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import sigkill_when_blocked

from actcomp.app.cli import main
from actcomp.export import export_bundle
from actcomp.export.bundle import BUNDLE_FILES

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

ROOT = Path(__file__).resolve().parents[2]

# The bundle of tests/export/test_runner.py: two trainable Linear layers on frozen conv features.
MAKE = """
import torch
from torch import nn
from actcomp.app.data import digits
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(4), nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 5))
model[:4].requires_grad_(False)
x, y = digits((5, 6, 7, 8, 9), size=16)
batch, data = (x[:16], y[:16]), (x[:160], y[:160])
"""


def made():
    scope: dict = {}
    exec(MAKE, scope)  # noqa: S102 - the test's own model, shared with the child process below
    return scope["model"], scope["batch"], scope["data"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model, batch, data = made()
    bundle = tmp_path_factory.mktemp("bundle") / "b"
    export_bundle(model, batch, bundle, data=data, lr=0.1)
    return bundle


@pytest.fixture
def bundle(exported, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(exported, copy)
    return copy


def files_of(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def run_runner(bundle, *argv):
    return subprocess.run([sys.executable, str(bundle / "runner.py"), *map(str, argv)], capture_output=True, text=True, check=False)


def test_a_bundle_holds_its_files_and_nothing_else(exported):
    """No step.onnx.data (the exporter wrote one, empty or not, that the saved graph does not
    reference), no lock, no temporary file, no directory left beside it."""
    assert sorted(p.name for p in exported.iterdir()) == sorted(BUNDLE_FILES)
    assert sorted(p.name for p in exported.parent.iterdir()) == ["b"]
    import onnx

    graph = onnx.load(str(exported / "step.onnx"), load_external_data=False)
    assert not [t.name for t in graph.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]


def test_a_trained_bundle_is_not_replaced_without_overwrite(bundle, tmp_path):
    model, batch, data = made()
    assert run_runner(bundle, "--steps", "2").returncode == 0
    trained = files_of(bundle)
    with pytest.raises(ValueError, match=r"bundle '.*b' has been trained \(its state.npz differs from initial_state.npz\); .*overwrite=True"):
        export_bundle(model, batch, bundle, data=data, lr=0.1)
    assert files_of(bundle) == trained
    # With overwrite=True the new bundle replaces it whole: state.npz is the initial state again.
    export_bundle(model, batch, bundle, data=data, lr=0.1, overwrite=True)
    with np.load(bundle / "state.npz") as state, np.load(bundle / "initial_state.npz") as initial:
        assert all(np.array_equal(state[k], initial[k]) for k in initial.files)
    assert sorted(p.name for p in bundle.iterdir()) == sorted(BUNDLE_FILES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    # An untrained bundle is replaced without asking (nothing is lost).
    export_bundle(model, batch, bundle, data=data, lr=0.1)


def test_a_directory_with_other_files_is_not_replaced(tmp_path):
    model, batch, data = made()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"holds files that are not a bundle's \(notes.txt\); a bundle replaces its whole directory"):
        export_bundle(model, batch, tmp_path / "mine", data=data)
    assert files_of(tmp_path / "mine") == {"notes.txt": b"keep me"}


# The child exports over an existing bundle and blocks while it writes the new manifest (the
# last file but runner.py; everything else of the new bundle is written by then).
KILLED_EXPORT = MAKE + """
import os, re, sys, time
from actcomp.export import export_bundle
real_open = os.open
def blocking_open(path, flags, *args, **kwargs):
    if re.fullmatch(r"manifest[.]json([.][0-9]+[.][0-9a-f]+)?[.]tmp", os.path.basename(str(path))):
        print("BLOCKED", flush=True)
        time.sleep(600)
    return real_open(path, flags, *args, **kwargs)
os.open = blocking_open
export_bundle(model, batch, sys.argv[1], data=data, lr=0.05, momentum=0.5)
"""


def test_a_kill_during_an_export_leaves_the_old_bundle_whole(bundle, tmp_path):
    before = files_of(bundle)
    sigkill_when_blocked([sys.executable, "-c", KILLED_EXPORT, str(bundle)], ROOT)
    after = files_of(bundle)
    assert after.pop(".actcomp.lock")  # the dead export's lock: the next writer takes it over
    assert after == before  # not one file of the new bundle among the old ones
    assert [p.name for p in tmp_path.iterdir() if p.name != "b"]  # the new bundle was under way beside it
    assert run_runner(bundle, "--steps", "1").returncode == 0  # the old bundle runs (the dead export's lock is taken over)
    # The next export removes what the killed one left, and replaces the bundle.
    model, batch, data = made()
    export_bundle(model, batch, bundle, data=data, lr=0.1, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    assert json.loads((bundle / "manifest.json").read_text())["lr"] == 0.1


def test_the_command_line_refuses_a_trained_bundle_before_any_work(bundle, capsys, monkeypatch):
    assert run_runner(bundle, "--steps", "1").returncode == 0
    calls = []

    def fake_export_bundle(model, batch, out, **kwargs):
        calls.append(kwargs)
        return {"step_bytes": 1, "verified_max_abs_error": 0.0, "memory_plan": {"peak_bytes": 1, "weights_bytes": 1}}

    monkeypatch.setattr("actcomp.export.export_bundle", fake_export_bundle)
    monkeypatch.setattr("actcomp.app.finetune.load_data", lambda *a: pytest.fail("refused only after loading data"))
    assert main(["export", "--step", "--out", str(bundle)]) == 2
    err = capsys.readouterr().err
    assert "has been trained (its state.npz differs from initial_state.npz)" in err and "--overwrite" in err and err.count("\n") == 1
    assert main(["export", "--out", str(bundle)]) == 2  # the inference graph would replace the bundle's model.onnx
    assert "holds a fine-tuning bundle; write the inference graph to another directory" in capsys.readouterr().err
    monkeypatch.undo()
    monkeypatch.setattr("actcomp.export.export_bundle", fake_export_bundle)
    assert main(["export", "--step", "--overwrite", "--out", str(bundle)]) == 0
    assert calls[-1]["overwrite"] is True
