"""actcomp finetune: outputs, and --resume after an interruption gives the same final weights."""

import errno
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import sigkill_when_blocked

from actcomp.app.cli import main
from actcomp.app.finetune import FinetuneConfig, load_checkpoint, run_finetune
from actcomp.core.files import LOCK_NAME, temporaries


class Interrupted(Exception):
    pass


def interrupt_after(epoch):
    def hook(done):
        if done == epoch:
            raise Interrupted

    return hook


@pytest.mark.parametrize("method", ["hosvd", "asi", "oneshot"])
def test_resume_after_interruption_equals_uninterrupted_run(tmp_path, method):
    config = FinetuneConfig(method=method, epochs=2, batch_size=64, layers="last:3", optimizer="momentum", lr=0.02)
    run_finetune(config, tmp_path / "straight", progress=False)
    with pytest.raises(Interrupted):
        run_finetune(config, tmp_path / "broken", progress=False, after_epoch=interrupt_after(1))
    assert not (tmp_path / "broken" / "model.pt").exists()
    metrics = run_finetune(config, tmp_path / "broken", resume=True, progress=False)
    assert [m["epoch"] for m in metrics] == [1, 2]
    a = torch.load(tmp_path / "straight" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "broken" / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "straight" / "metrics.json").read_text())[1]["train_loss"] == metrics[1]["train_loss"]


def test_outputs_and_budget_plan(tmp_path):
    out = tmp_path / "run"
    argv = ["finetune", "--epochs", "1", "--batch-size", "64", "--budget", "1MiB", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    for name in ("config.json", "plan.json", "metrics.csv", "metrics.json", "checkpoint.pt", "model.pt"):
        assert (out / name).exists(), name
    row = json.loads((out / "metrics.json").read_text())[0]
    assert row["saved_bytes"] <= 2**20 and 0 <= row["test_accuracy"] <= 1
    assert (out / "metrics.csv").read_text().splitlines()[0].startswith("epoch,train_loss,test_accuracy")


def test_resume_refuses_other_settings(tmp_path):
    run_finetune(FinetuneConfig(epochs=1, batch_size=128, layers="last:1"), tmp_path, progress=False)
    with pytest.raises(ValueError, match="cannot resume with different settings: eps"):
        run_finetune(FinetuneConfig(epochs=2, batch_size=128, layers="last:1", eps=0.5), tmp_path, resume=True, progress=False)
    with pytest.raises(ValueError, match="nothing to resume"):
        run_finetune(FinetuneConfig(), tmp_path / "empty", resume=True, progress=False)


def test_imagefolder_data(tmp_path):
    """An ImageFolder directory (one sub-directory per class) trains like the bundled digits."""
    from PIL import Image

    rng = torch.Generator().manual_seed(0)
    for c, name in enumerate(("cats", "dogs", "owls")):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(6):
            pixels = (torch.rand(12, 12, 3, generator=rng) * 80 + 80 * c).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / "images" / name / f"{i}.png")
    argv = [
        "finetune", "--data", str(tmp_path / "images"), "--size", "16", "--epochs", "2", "--batch-size", "4",
        "--layers", "last:2", "--out", str(tmp_path / "run"), "--no-progress",
    ]
    assert main(argv) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert len(metrics) == 2 and metrics[-1]["saved_bytes"] > 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["data"] == str(tmp_path / "images")


# --- Reliability: nothing a run wrote is lost, nothing in a run directory runs code. ---

ROOT = Path(__file__).resolve().parents[2]
QUICK_RUN = FinetuneConfig(method="asi", epochs=2, batch_size=128, layers="last:2", optimizer="momentum", lr=0.02)


class MakesMarker:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def quick_argv(out, *extra):
    c = QUICK_RUN
    return [
        "finetune", "--method", c.method, "--epochs", str(c.epochs), "--batch-size", str(c.batch_size), "--layers", c.layers,
        "--optimizer", c.optimizer, "--lr", str(c.lr), "--out", str(out), "--no-progress", *extra,
    ]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    torch.manual_seed(0)
    run_finetune(QUICK_RUN, out, progress=False)
    return torch.load(out / "model.pt", weights_only=True)


# The child blocks inside the atomic write of epoch 2's checkpoint (half of the bytes written, or
# all written and being flushed) and says so; the parent then SIGKILLs it.
KILLED_CHILD = """
import os, re, sys, time
from actcomp.app.cli import main
where, target = sys.argv[1], sys.argv[2]
paths, opened = {}, []
real_open, real_write, real_fsync = os.open, os.write, os.fsync
def temporary(path):  # the writer's own temporary name of the target: NAME.<pid>.<random>.tmp
    return re.fullmatch(re.escape(target) + r"[.][0-9]+[.][0-9a-f]+[.]tmp", os.path.basename(str(path))) is not None
def tracked_open(path, flags, *args, **kwargs):
    fd = real_open(path, flags, *args, **kwargs)
    paths[fd] = str(path)
    if temporary(path):
        opened.append(fd)
    return fd
def block(fd, data=b""):
    if temporary(paths.get(fd, "")) and len(opened) == 2:
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
sys.exit(main(sys.argv[3:]))
"""


def run_until_blocked(args, where, target):
    sigkill_when_blocked([sys.executable, "-c", KILLED_CHILD, where, target, *args], ROOT)


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_sigkill_during_a_checkpoint_write_loses_nothing(tmp_path, uninterrupted, where):
    """SIGKILL while epoch 2's checkpoint is being written: checkpoint.pt is still epoch 1's,
    whole, and --resume finishes with the weights of an uninterrupted run."""
    out = tmp_path / "run"
    run_until_blocked(quick_argv(out), where, "checkpoint.pt")
    assert temporaries(out / "checkpoint.pt")  # the write really was under way
    assert (out / LOCK_NAME).exists()  # the killed run's lock is left: the next run takes it over
    assert load_checkpoint(out / "checkpoint.pt", torch.device("cpu"))["epoch"] == 1
    assert not (out / "model.pt").exists()
    assert main(quick_argv(out, "--resume")) == 0
    resumed = torch.load(out / "model.pt", weights_only=True)
    assert resumed.keys() == uninterrupted.keys() and all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
    assert not temporaries(out / "checkpoint.pt") and not (out / LOCK_NAME).exists()


def test_a_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path, capsys):
    out, marker = tmp_path / "run", tmp_path / "marker"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(QUICK_RUN.as_dict()))
    torch.save({"model": {}, "optimizer": {}, "rng": MakesMarker(marker), "layers": {}, "metrics": [], "epoch": 1}, out / "checkpoint.pt")
    assert main(quick_argv(out, "--resume")) == 2
    err = capsys.readouterr().err
    assert "checkpoint" in err and "refused: it holds a reference to" in err and err.count("\n") == 1
    assert not marker.exists()


def test_a_truncated_checkpoint_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(QUICK_RUN.as_dict()))
    torch.save({"model": {"w": torch.randn(1000)}}, out / "checkpoint.pt")
    data = (out / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(data[: len(data) // 3])
    assert main(quick_argv(out, "--resume")) == 2
    err = capsys.readouterr().err
    assert "is truncated, corrupt or not a torch.save file" in err and err.count("\n") == 1


def test_trackers_are_stored_as_plain_data(tmp_path):
    run_finetune(FinetuneConfig(method="asi", epochs=1, batch_size=128, layers="last:2"), tmp_path, progress=False)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    trackers = {n: s["method_state"] for n, s in state["layers"].items() if s["kind"] == "layer"}
    assert len(trackers) == 2
    for tracker in trackers.values():
        assert set(tracker) == {"margin", "factors", "recomputed", "steps"} and tracker["steps"] > 0
        assert tracker["factors"] and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tracker["factors"].items())


def test_an_existing_run_is_refused_unless_resume_or_overwrite(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("config.json", "plan.json", "metrics.json"):
        (out / name).write_text("{}")
    monkeypatch.setattr("actcomp.app.finetune.load_data", lambda *a: pytest.fail("refused only after loading data"))
    assert main(quick_argv(out)) == 2
    err = capsys.readouterr().err
    assert "already holds a run (config.json, plan.json, metrics.json); give --resume" in err and err.count("\n") == 1
    assert main(quick_argv(out, "--resume", "--overwrite")) == 2
    assert "not both" in capsys.readouterr().err
    monkeypatch.undo()
    assert main([*quick_argv(out, "--overwrite"), "--epochs", "1"]) == 0
    assert not (out / "plan.json").exists()  # the old run's files are gone, the new run's are there
    assert json.loads((out / "config.json").read_text())["epochs"] == 1 and (out / "checkpoint.pt").exists()


def test_disk_full_is_one_line_and_leaves_no_temporary(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    assert main(quick_argv(out)) == 1
    err = capsys.readouterr().err
    assert err.startswith("actcomp finetune: error: [Errno 28] disk full: could not write") and err.count("\n") == 1
    assert sorted(p.name for p in out.iterdir()) == []


def test_disk_full_mid_run_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    def fill_disk_after(epoch):
        def full(fd):
            raise OSError(errno.ENOSPC, "No space left on device")

        if epoch == 1:
            monkeypatch.setattr(os, "fsync", full)

    with pytest.raises(OSError, match="disk full: could not write .*checkpoint.pt"):
        run_finetune(QUICK_RUN, tmp_path, progress=False, after_epoch=fill_disk_after)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "checkpoint.pt", torch.device("cpu"))["epoch"] == 1
    assert not temporaries(tmp_path / "checkpoint.pt") and not (tmp_path / LOCK_NAME).exists()


def test_config_of_an_older_run_reads_device_as_target():
    old = {**FinetuneConfig().as_dict(), "device": "stm32h743"}
    del old["target"]
    assert FinetuneConfig.from_dict(old).target == "stm32h743"
    with pytest.raises(ValueError, match="unknown setting\\(s\\) 'colour'"):
        FinetuneConfig.from_dict({"colour": 1})


# --- One writer per run directory (issue 22, item 1). ---

# The child holds the run directory and blocks just before training (it says so); the parent
# tries a second run into the same --out, then SIGKILLs the child and starts again.
BLOCKED_RUN = """
import sys, time
import actcomp.app.finetune as finetune
from actcomp.app.cli import main
def blocked(*args, **kwargs):
    print("BLOCKED", flush=True)
    time.sleep(600)
finetune.make_optimizer = blocked
sys.exit(main(sys.argv[1:]))
"""


def test_a_second_run_into_one_out_is_refused_naming_the_first(tmp_path, capsys):
    out = tmp_path / "run"
    child = subprocess.Popen([sys.executable, "-c", BLOCKED_RUN, *quick_argv(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "BLOCKED", child.stderr.read()[-2000:]
        for extra in ((), ("--overwrite",), ("--seed", "1", "--epochs", "1")):
            assert main(quick_argv(out, *extra)) == 2
            err = capsys.readouterr().err
            assert re.search(rf"run directory '.*run' is in use by another writer: pid {child.pid} on \S+ since .*; wait for that run to finish, or give another --out", err), err
            assert err.count("\n") == 1
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # the refused runs wrote nothing
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
        child.stderr.close()
    # The killed run's lock is stale: the next run takes it over.
    assert (out / LOCK_NAME).exists()
    assert main([*quick_argv(out), "--epochs", "1"]) == 0
    assert json.loads((out / "config.json").read_text())["epochs"] == 1 and not (out / LOCK_NAME).exists()


# --- Resume: epochs, and checkpoints that cannot be a run's (issue 22, item 8). ---


def argv_without_epochs(out, *extra):
    argv = quick_argv(out, *extra)
    at = argv.index("--epochs")
    return argv[:at] + argv[at + 2 :]


def test_resume_with_other_epochs_updates_config_and_without_epochs_finishes_the_run(tmp_path):
    out = tmp_path / "run"
    assert main([*quick_argv(out), "--epochs", "1"]) == 0
    assert main([*quick_argv(out, "--resume"), "--epochs", "2"]) == 0
    assert json.loads((out / "config.json").read_text())["epochs"] == 2
    assert [m["epoch"] for m in json.loads((out / "metrics.json").read_text())] == [1, 2]
    # Interrupted after epoch 1 of 2; --resume without --epochs ends at 2 (not the default 5).
    other = tmp_path / "other"
    with pytest.raises(Interrupted):
        run_finetune(QUICK_RUN, other, progress=False, after_epoch=interrupt_after(1))
    assert main(argv_without_epochs(other, "--resume")) == 0
    assert [m["epoch"] for m in json.loads((other / "metrics.json").read_text())] == [1, 2]
    assert json.loads((other / "config.json").read_text())["epochs"] == 2
    # A fresh run without --epochs takes the default.
    assert main([*argv_without_epochs(tmp_path / "fresh"), "--batch-size", "600"]) == 0
    assert json.loads((tmp_path / "fresh" / "config.json").read_text())["epochs"] == 5


@pytest.fixture(scope="module")
def one_epoch_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("one-epoch")
    with pytest.raises(Interrupted):
        run_finetune(QUICK_RUN, out, progress=False, after_epoch=interrupt_after(1))
    return out


@pytest.mark.parametrize(
    "epoch, metrics, message",
    [
        (-5, 1, "is damaged: it is at epoch -5 with 1 epoch(s) of metrics"),
        (0, 0, "is damaged: it is at epoch 0"),
        (99, 1, "is damaged: it is at epoch 99 with 1 epoch(s) of metrics"),
        (99, 99, "is at epoch 99, beyond the run's 2 epochs; give --epochs 99 or more"),
        (True, 1, "epoch, metrics or rng of the wrong type"),
    ],
)
def test_a_checkpoint_at_an_impossible_epoch_is_refused(one_epoch_checkpoint, tmp_path, capsys, epoch, metrics, message):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text((one_epoch_checkpoint / "config.json").read_text())
    state = torch.load(one_epoch_checkpoint / "checkpoint.pt", weights_only=True)
    state["epoch"], state["metrics"] = epoch, state["metrics"] * metrics
    torch.save(state, out / "checkpoint.pt")
    assert main(quick_argv(out, "--resume")) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (out / "model.pt").exists()


def test_random_bytes_as_checkpoint_or_weights_are_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(QUICK_RUN.as_dict()))
    junk = b"\x80\xe3" + bytes(torch.randint(0, 256, (5000,), generator=torch.Generator().manual_seed(1), dtype=torch.uint8).tolist())
    (out / "checkpoint.pt").write_bytes(junk)
    (tmp_path / "w.pt").write_bytes(junk)
    for argv in (quick_argv(out, "--resume"), quick_argv(tmp_path / "other", "--weights", str(tmp_path / "w.pt"))):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "is truncated, corrupt or not a torch.save file" in err and err.count("\n") == 1
        assert "loading would run" not in err and "Warning" not in err


# --- torchvision models at the default size (issue 22, item 4). ---


@pytest.fixture
def few_digits(monkeypatch):
    """The digits as finetune loads them, cut to 48 training and 16 test samples (the models
    still see --size 32 images; only the epoch is shorter)."""
    from actcomp.app import finetune

    real = finetune.load_data

    def load(data, size=32, seed=0):
        d = real(data, size, seed)
        return finetune.Dataset(d.train_x[:48], d.train_y[:48], d.test_x[:16], d.test_y[:16], d.num_classes)

    monkeypatch.setattr(finetune, "load_data", load)


@pytest.mark.parametrize("model", ["resnet18", "mobilenet_v2", "googlenet"])
def test_torchvision_models_fine_tune_at_the_default_size(tmp_path, capsys, few_digits, model):
    """The README's example: the lazy-module probe used to run one sample in training mode, which
    BatchNorm on a 1x1 map refuses ("Expected more than 1 value per channel")."""
    pytest.importorskip("torchvision")
    assert main(["finetune", "--model", model, "--epochs", "1", "--out", str(tmp_path / "R"), "--no-progress"]) == 0, capsys.readouterr().err
    assert len(json.loads((tmp_path / "R" / "metrics.json").read_text())) == 1
    assert main(["measure", "--model", model, "--batch-size", "8"]) == 0


def test_a_model_that_cannot_take_the_size_says_so(capsys, few_digits):
    pytest.importorskip("torchvision")
    assert main(["measure", "--model", "inception_v3"]) == 2
    err = capsys.readouterr().err
    assert "model 'inception_v3' takes images of at least 75x75 pixels; give --size 75 or more" in err and err.count("\n") == 1
    assert main(["measure", "--model", "resnet18", "--batch-size", "1"]) == 2
    err = capsys.readouterr().err
    assert "a BatchNorm layer sees one value per channel" in err and "give --batch-size 2 or more" in err and "Expected more" not in err


def test_a_last_batch_of_one_sample_joins_the_one_before():
    from actcomp.app.finetune import batch_starts

    assert batch_starts(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert batch_starts(9, 3) == [(0, 3), (3, 6), (6, 9)]
    assert batch_starts(1, 3) == [(0, 1)]
    assert batch_starts(11, 5) == [(0, 5), (5, 11)]
