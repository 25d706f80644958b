"""finetune --optimizer singd|hylo (resume exact), compare --optimizers, optimizer state bytes."""

import csv
import importlib.util
import sys

import pytest
import torch
from torch import nn

import actcomp
from actcomp.app.cli import main
from actcomp.app.finetune import FinetuneConfig, run_finetune
from actcomp.optim import HyLo
from actcomp.app.optim_compare import state_bytes


class Interrupted(Exception):
    pass


def stop_after_first(done):
    if done == 1:
        raise Interrupted


@pytest.mark.parametrize("optimizer", ["hylo", "singd"])
def test_resume_equals_uninterrupted_run(tmp_path, optimizer):
    if optimizer == "singd":
        pytest.importorskip("singd")
    config = FinetuneConfig(size=16, epochs=2, batch_size=256, layers="last:2", optimizer=optimizer, lr=0.01)
    run_finetune(config, tmp_path / "straight", progress=False)
    with pytest.raises(Interrupted):
        run_finetune(config, tmp_path / "broken", progress=False, after_epoch=stop_after_first)
    run_finetune(config, tmp_path / "broken", resume=True, progress=False)
    a = torch.load(tmp_path / "straight" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "broken" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_finetune_without_singd_is_one_line(tmp_path, monkeypatch, capsys):
    for name in [m for m in sys.modules if m == "singd" or m.startswith("singd.")] + ["actcomp.optim.singd"]:
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setitem(sys.modules, "singd", None)
    for argv in (["finetune", "--optimizer", "singd"], ["compare", "--optimizers", "sgd,singd"]):
        assert main([*argv, "--out", str(tmp_path), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "actcomp[singd]" in err and len(err.strip().splitlines()) == 1


def test_state_bytes_counts_what_each_optimizer_keeps():
    torch.manual_seed(0)
    model = actcomp.compress(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)), method="hosvd", eps=0.9)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    hylo = HyLo(model, update_freq=1)
    for optimizer in (sgd, hylo):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert state_bytes(sgd) == parameter_bytes  # one momentum buffer per parameter
    kept = sum(p.nbytes for p in hylo.preconditioners.values())
    assert kept > 0 and state_bytes(hylo) == parameter_bytes + kept


def test_compare_optimizers_command(tmp_path, capsys):
    names = "momentum,adam,hylo,singd" if importlib.util.find_spec("singd") else "momentum,adam,hylo"
    argv = ["compare", "--optimizers", names, "--max-layers", "2", "--epochs", "1", "--pretrain-epochs", "1",
            "--batch-size", "256", "--out", str(tmp_path), "--no-progress"]
    assert main(argv) == 0
    assert "optimizer state" in capsys.readouterr().out
    with open(tmp_path / "optimizers.csv") as f:
        points = list(csv.DictReader(f))
    assert [p["optimizer"] for p in points] == names.split(",")
    assert len({p["saved_bytes"] for p in points}) == 1  # same compression, same first batch
    assert all(int(p["layer_bytes"]) < int(p["input_bytes"]) for p in points)
    state = {p["optimizer"]: int(p["state_bytes"]) for p in points}
    assert 0 < state["momentum"] < state["adam"] < state["hylo"]  # "momentum": SGD with 0.9 ("sgd" keeps no state)
    assert all(0 <= float(p["accuracy"]) <= 1 for p in points)
