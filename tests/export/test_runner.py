"""The bundle's runner: checked input, atomic state writes that survive SIGKILL, no torch needed."""

import importlib.util
import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import sigkill_when_blocked
from torch import nn

from actcomp.app.data import digits
from actcomp.export import export_bundle

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

# Makes torch (and actcomp, which needs it) unimportable, as on a device without PyTorch.
BLOCKER = """
import sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "actcomp"):
            raise ImportError(f"{name} is blocked: the runner must not need it")
sys.meta_path.insert(0, Blocker())
for name in [m for m in sys.modules if m.split(".")[0] in ("torch", "actcomp")]:
    del sys.modules[name]
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One bundle (two trainable Linear layers on frozen conv features, 5 classes)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(4), nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 5))
    model[:4].requires_grad_(False)
    x, y = digits((5, 6, 7, 8, 9), size=16)
    bundle = tmp_path_factory.mktemp("bundle") / "b"
    export_bundle(model, (x[:16], y[:16]), bundle, data=(x[:160], y[:160]), lr=0.1)
    return bundle


@pytest.fixture
def bundle(exported, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(exported, copy)
    return copy


def run_main(bundle, *argv):
    """The bundle's own runner.py, imported from the bundle, main(argv) called in-process."""
    spec = importlib.util.spec_from_file_location(f"runner_{abs(hash(str(bundle)))}", bundle / "runner.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main([str(a) for a in argv])


def test_runner_trains_under_an_import_blocker_and_keeps_the_initial_state(bundle, tmp_path):
    initial = (bundle / "state.npz").read_bytes()
    code = BLOCKER + f"import runpy; sys.argv = ['runner.py', '--steps', '6']; runpy.run_path({str(bundle / 'runner.py')!r}, run_name='__main__')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=bundle)
    assert out.returncode == 0, out.stderr
    losses = [float(line.split()[-1]) for line in out.stdout.splitlines() if line.startswith("step")]
    assert len(losses) == 6 and np.isfinite(losses).all()
    assert (bundle / "initial_state.npz").read_bytes() == initial != (bundle / "state.npz").read_bytes()
    assert not leftovers(bundle)
    # The same six steps in this process (torch imported) give the same state.
    twin = tmp_path / "twin"
    shutil.copytree(bundle, twin)
    shutil.copy(twin / "initial_state.npz", twin / "state.npz")
    assert run_main(twin, "--steps", "6") == 0
    with np.load(bundle / "state.npz") as blocked, np.load(twin / "state.npz") as free:
        assert blocked.files == free.files and all(np.allclose(blocked[k], free[k], rtol=1e-6, atol=1e-7) for k in blocked.files)
    # The blocker does block: the same interpreter set-up cannot import torch.
    blocked = subprocess.run([sys.executable, "-c", BLOCKER + "import torch"], capture_output=True, text=True)
    assert blocked.returncode != 0 and "torch is blocked" in blocked.stderr


def leftovers(bundle):
    """Temporary files and the lock in the bundle (none once a runner has finished)."""
    return sorted(p.name for p in bundle.iterdir() if p.name.endswith(".tmp") or p.name == ".actcomp.lock")


# The child (under the blocker) blocks inside the write of its temporary state file (half of
# the bytes written, or all written and being flushed) and says so; the parent then SIGKILLs it.
KILLED_RUNNER = BLOCKER + """
import os, re, runpy, time
where, runner = sys.argv[1], sys.argv[2]
paths = {}
real_open, real_write, real_fsync = os.open, os.write, os.fsync
def tracked_open(path, flags, *args, **kwargs):
    fd = real_open(path, flags, *args, **kwargs)
    paths[fd] = str(path)
    return fd
def block(fd, data=b""):
    if re.fullmatch(r"state[.]npz[.][0-9]+[.][0-9a-f]+[.]tmp", os.path.basename(paths.get(fd, ""))):
        if data:
            real_write(fd, bytes(data[: len(data) // 2]))
        print("BLOCKED", flush=True)
        time.sleep(600)
def write(fd, data):
    if where == "write":
        block(fd, data)
    return real_write(fd, data)
def fsync(fd):
    if where == "fsync":
        block(fd)
    return real_fsync(fd)
os.open, os.write, os.fsync = tracked_open, write, fsync
sys.argv = [runner, "--steps", "3", *sys.argv[3:]]
runpy.run_path(runner, run_name="__main__")
"""


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_sigkill_during_the_state_write_leaves_the_old_state(bundle, where):
    before = (bundle / "state.npz").read_bytes()
    sigkill_when_blocked([sys.executable, "-c", KILLED_RUNNER, where, str(bundle / "runner.py")], bundle)
    left = leftovers(bundle)
    assert len(left) == 2 and left[0] == ".actcomp.lock" and left[1].startswith("state.npz.")  # the write really was under way
    assert (bundle / "state.npz").read_bytes() == before
    with np.load(bundle / "state.npz") as state:
        assert all(np.isfinite(state[k]).all() for k in state.files)
    # The leftover temporary file and the dead runner's lock do not stand in the way of the next run.
    assert run_main(bundle, "--steps", "2") == 0
    assert (bundle / "state.npz").read_bytes() != before and not leftovers(bundle)


def data_file(bundle, tmp_path, edit):
    with np.load(bundle / "data.npz") as d:
        arrays = {"x": d["x"], "y": d["y"]}
    edit(arrays)
    np.savez(tmp_path / "mine.npz", **arrays)
    return tmp_path / "mine.npz"


def with_nan(a):
    a["x"] = a["x"].copy()
    a["x"][3, 0, 2, 2] = np.nan


BAD_DATA = [
    (lambda a: a.update(y=np.where(a["y"] == 4, 5, a["y"])), "labels must lie in 0..4, got 0..5"),
    (lambda a: a.update(y=a["y"] - 1), "labels must lie in 0..4, got -1..3"),
    (lambda a: a.update(y=a["y"].astype(np.float32)), "y must be a 1-D array of integer class labels, got float32"),
    (lambda a: a.update(y=a["y"][:-7]), "x has 160 samples but y has 153 labels"),
    (lambda a: a.update(x=(a["x"] * 255).astype(np.uint8)), "scale the samples as the model was trained (uint8 images: divide by 255)"),
    (lambda a: a.update(x=a["x"] * 255), "|x| reaches 255 but the bundle's data reaches 1"),
    (with_nan, "x holds NaN or Inf"),
    (lambda a: a.update(x=a["x"][:, :, :8, :8]), "samples have shape (1, 8, 8), the step takes (1, 16, 16)"),
    (lambda a: a.pop("y"), "lacks the array(s) y"),
    (lambda a: a.update(x=a["x"][:10], y=a["y"][:10]), "holds 10 samples; the step's static batch is 16"),
]


@pytest.mark.parametrize("edit, message", BAD_DATA)
def test_bad_data_is_one_line_exit_2_and_the_state_untouched(bundle, tmp_path, capsys, edit, message):
    before = (bundle / "state.npz").read_bytes()
    assert run_main(bundle, "--data", data_file(bundle, tmp_path, edit), "--steps", "2") == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("runner.py: error: ") and err.count("\n") == 1
    assert (bundle / "state.npz").read_bytes() == before


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lr", "nan"], "--lr must be a positive finite number, got nan"),
        (["--lr", "-1"], "--lr must be a positive finite number, got -1.0"),
        (["--lr", "inf"], "--lr must be a positive finite number, got inf"),
        (["--steps", "-5"], "--steps must be at least 1, got -5"),
        (["--data", "/no/such.npz"], "data '/no/such.npz' does not exist"),
        (["--out", "initial_state.npz"], "--out must not be initial_state.npz"),
        (["--out", "/no/such/dir/state.npz"], "must be a file in an existing directory"),
    ],
)
def test_bad_settings_are_one_line_exit_2(bundle, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(bundle)
    before = (bundle / "state.npz").read_bytes()
    assert run_main(bundle, *argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert (bundle / "state.npz").read_bytes() == before


def test_divergence_saves_nothing(bundle, capsys):
    before = (bundle / "state.npz").read_bytes()
    assert run_main(bundle, "--lr", "1e30", "--steps", "5") == 1
    err = capsys.readouterr().err
    assert "produced NaN or Inf" in err and "nothing was saved" in err and err.count("\n") == 1
    assert (bundle / "state.npz").read_bytes() == before
    # A loss that stays finite but grows beyond 1e6 times the first step's is a diverged run too
    # (issue 22, item 7: lr 1e10 took it to 1e16 and the state was saved).
    assert run_main(bundle, "--lr", "1e10", "--steps", "5") == 1
    err = capsys.readouterr().err
    assert re.search(r"step \d: the loss \S+ exceeds 1e\+06 times the first step's \(\S+\); the run diverged and nothing was saved", err), err
    assert err.count("\n") == 1 and (bundle / "state.npz").read_bytes() == before and not leftovers(bundle)


def test_a_state_with_pickled_objects_runs_nothing(bundle, tmp_path, capsys):
    marker = tmp_path / "marker"

    class MakesMarker:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    np.savez(tmp_path / "evil.npz", **{"4.weight": np.array([MakesMarker()], dtype=object)})
    assert run_main(bundle, "--state", tmp_path / "evil.npz", "--steps", "1") == 2
    assert "is not a readable .npz file" in capsys.readouterr().err
    assert not marker.exists()


def test_a_bundle_from_before_initial_state_keeps_it_on_the_first_save(bundle):
    (bundle / "initial_state.npz").unlink()
    initial = (bundle / "state.npz").read_bytes()
    assert run_main(bundle, "--steps", "1") == 0
    assert (bundle / "initial_state.npz").read_bytes() == initial != (bundle / "state.npz").read_bytes()


@pytest.mark.parametrize(
    "data, message",
    [
        ((torch.randn(20, 1, 16, 16), torch.full((20,), 5)), "labels must lie in 0..4"),
        ((torch.randn(20, 1, 16, 16), torch.zeros(19, dtype=torch.long)), "x has 20 samples but y has 19 labels"),
        ((torch.randn(20, 1, 16, 16), torch.zeros(20)), "y must be a 1-D tensor of integer class labels"),
        ((torch.full((20, 1, 16, 16), float("nan")), torch.zeros(20, dtype=torch.long)), "x holds NaN or Inf"),
    ],
)
def test_export_bundle_checks_its_data_first(tmp_path, data, message):
    model = nn.Sequential(nn.Flatten(), nn.Linear(256, 5))
    x, y = torch.randn(4, 1, 16, 16), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=message):
        export_bundle(model, (x, y), tmp_path / "b", data=data)
    with pytest.raises(ValueError, match="lr must be a positive finite number"):
        export_bundle(model, (x, y), tmp_path / "b", lr=float("nan"))
    assert not (tmp_path / "b").exists()


# --- One runner per bundle; --out never names the bundle's own files (issue 22, item 3). ---

# The child runner holds the bundle and blocks before its first step (it says so).
BLOCKED_RUNNER = BLOCKER + """
import runpy, time
import onnxruntime
class Blocked:
    def __init__(self, *args, **kwargs):
        print("BLOCKED", flush=True)
        time.sleep(600)
onnxruntime.InferenceSession = Blocked
sys.argv = [sys.argv[1], "--steps", "2", *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_second_runner_is_refused_naming_the_first(bundle, tmp_path, capsys):
    before = (bundle / "state.npz").read_bytes()
    child = subprocess.Popen([sys.executable, "-c", BLOCKED_RUNNER, str(bundle / "runner.py"), "--out", str(tmp_path / "mine.npz")],
                             cwd=bundle, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "BLOCKED", child.stderr.read()[-2000:]
        for argv in ((), ("--out", tmp_path / "other.npz")):  # whatever it writes, the bundle is held
            assert run_main(bundle, "--steps", "1", *argv) == 2
            err = capsys.readouterr().err
            assert re.search(rf"runner.py: error: bundle '.*' is in use by another writer: pid {child.pid} on \S+ since ", err), err
            assert err.count("\n") == 1
        with pytest.raises(ValueError, match=rf"bundle '.*' is in use by another writer: pid {child.pid}"):
            export_bundle(*TINY_EXPORT, bundle, overwrite=True)  # nor may an export replace it meanwhile
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
        child.stderr.close()
    assert (bundle / "state.npz").read_bytes() == before
    assert run_main(bundle, "--steps", "1") == 0  # the dead runner's lock is taken over
    assert not leftovers(bundle)


TINY_EXPORT = (nn.Sequential(nn.Flatten(), nn.Linear(256, 5)), (torch.randn(4, 1, 16, 16), torch.zeros(4, dtype=torch.long)))


@pytest.mark.parametrize("name", ["manifest.json", "data.npz", "step.onnx", "model.onnx", "runner.py", ".actcomp.lock"])
def test_out_may_not_name_a_file_of_the_bundle(bundle, capsys, monkeypatch, name):
    monkeypatch.chdir(bundle)
    files = {p.name: p.read_bytes() for p in bundle.iterdir() if p.is_file()}
    assert run_main(bundle, "--steps", "1", "--out", name) == 2
    err = capsys.readouterr().err
    assert f"--out must not be the bundle's {name}" in err and err.count("\n") == 1
    assert {p.name: p.read_bytes() for p in bundle.iterdir() if p.is_file()} == files
    assert run_main(bundle, "--steps", "1", "--data", bundle / "data.npz", "--out", bundle / "data.npz") == 2
    assert "--out must not be the bundle's data.npz" in capsys.readouterr().err


def write_json(path, value):
    path.write_text(json.dumps(value))


def edit_manifest(key, value):
    def edit(bundle):
        manifest = json.loads((bundle / "manifest.json").read_text())
        if value is None:
            del manifest[key]
        else:
            manifest[key] = value
        write_json(bundle / "manifest.json", manifest)

    return edit


def truncate(name):
    def edit(bundle):
        data = (bundle / name).read_bytes()
        (bundle / name).write_bytes(data[: len(data) // 2])

    return edit


def edit_state(change):
    def edit(bundle):
        with np.load(bundle / "state.npz") as state:
            arrays = {k: state[k] for k in state.files}
        change(arrays)
        np.savez(bundle / "state.npz", **arrays)

    return edit


def first_weight(arrays):
    return min(k for k in arrays if "weight" in k)


DAMAGED = [
    ("manifest {}", lambda b: write_json(b / "manifest.json", {}), "is damaged or not this bundle's manifest: 'step' is missing"),
    ("manifest [1, 2]", lambda b: write_json(b / "manifest.json", [1, 2]), "is damaged or not this bundle's manifest: it holds a JSON list, not an object"),
    ("manifest without state_inputs", edit_manifest("state_inputs", None), "'state_inputs' is missing"),
    ("manifest batch_size text", edit_manifest("batch_size", "16"), "'batch_size' is not a whole number >= 1"),
    ("manifest step outside", edit_manifest("step", "../step.onnx"), "'step' is not a file name in the bundle"),
    ("manifest x_dtype object", edit_manifest("x_dtype", "object"), "'x_dtype' is not float16, float32 or float64"),
    ("step.onnx truncated", truncate("step.onnx"), "step graph '.*step.onnx' is damaged or not an ONNX graph"),
    ("step.onnx missing", lambda b: (b / "step.onnx").unlink(), "step graph '.*step.onnx' is missing; export the bundle again"),
    ("step.onnx another graph", lambda b: shutil.copy(b / "model.onnx", b / "step.onnx"), "does not match .*manifest.json' \\(other inputs or outputs\\)"),
    ("state of another shape", edit_state(lambda a: a.update({first_weight(a): a[first_weight(a)][:-1]})), "has shape .*, the step takes"),
    ("state of another dtype", edit_state(lambda a: a.update({first_weight(a): a[first_weight(a)].astype(np.float64)})), "is float64, the step takes float32"),
    ("state of strings", edit_state(lambda a: a.update({first_weight(a): np.array(["a"])})), "the step takes float32"),
]


@pytest.mark.parametrize("name, damage, message", DAMAGED, ids=[d[0] for d in DAMAGED])
def test_a_damaged_bundle_is_one_line_and_exit_2(bundle, capsys, name, damage, message):
    damage(bundle)
    state = (bundle / "state.npz").read_bytes()
    assert run_main(bundle, "--steps", "1") == 2
    err = capsys.readouterr().err
    assert err.startswith("runner.py: error: ") and re.search(message, err) and err.count("\n") == 1, err
    assert "Traceback" not in err and (bundle / "state.npz").read_bytes() == state and not leftovers(bundle)


def test_a_read_only_bundle_trains_into_an_out_elsewhere(bundle, tmp_path, capsys, monkeypatch):
    """No lock can be taken in a bundle on a read-only medium; none is needed when the state
    is saved elsewhere (saving into the bundle is one line, exit 2). The medium is simulated:
    creating a file in the bundle fails with EROFS."""
    import errno
    import os

    before = {p.name: p.read_bytes() for p in bundle.iterdir()}
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if Path(path).parent == bundle and flags & os.O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    assert run_main(bundle, "--steps", "1", "--out", tmp_path / "mine.npz") == 0
    assert (tmp_path / "mine.npz").is_file()
    capsys.readouterr()
    assert run_main(bundle, "--steps", "1") == 2
    err = capsys.readouterr().err
    assert "cannot be written (Read-only file system)" in err and err.count("\n") == 1
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in bundle.iterdir()} == before
