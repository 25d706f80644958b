"""`actcomp compare --peft`: SVD-parametrised fine-tuning beside full and last-N fine-tuning."""

import csv

from actcomp.app.cli import main


def test_compare_peft_writes_csv_and_png(tmp_path, capsys):
    argv = ["compare", "--peft", "--max-layers", "2", "--reflections", "4", "--epochs", "1", "--pretrain-epochs", "1", "--no-progress", "--out", str(tmp_path)]
    assert main(argv) == 0
    with open(tmp_path / "peft.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["method", "layers", "trainable_params", "layer_bytes", "accuracy"]
    by_key = {(r["method"], int(r["layers"])): r for r in rows}
    labels = ["last-N", "svd s", "svd s+q r=4", "svd s+q r=4 + hosvd 0.8"]
    # N = 1 is the new classifier alone, trained plainly: no SVD run would differ from last-N
    assert set(by_key) == {("full", 15), ("last-N", 1)} | {(label, 2) for label in labels}
    params = {label: int(by_key[(label, 2)]["trainable_params"]) for label in labels}
    assert params["svd s"] < params["svd s+q r=4"] < params["last-N"] < int(by_key[("full", 15)]["trainable_params"])
    kept = {label: int(by_key[(label, 2)]["layer_bytes"]) for label in labels}
    assert kept["svd s"] == kept["svd s+q r=4"] == kept["last-N"] > kept["svd s+q r=4 + hosvd 0.8"]
    assert (tmp_path / "peft.png").stat().st_size > 10_000
    assert "trainable params" in capsys.readouterr().out


def test_compare_peft_refuses_odd_reflections(capsys):
    assert main(["compare", "--peft", "--reflections", "3"]) == 2
    assert "--reflections must be a positive even number" in capsys.readouterr().err
