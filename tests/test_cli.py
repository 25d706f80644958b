import json
import subprocess
import sys

import pytest

from actcomp.cli import main

QUICK = ["--epochs", "1", "--pretrain-epochs", "1", "--no-progress"]


def test_help_runs():
    result = subprocess.run([sys.executable, "-m", "actcomp.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert all(c in result.stdout for c in ("demo", "finetune", "measure", "plan", "compare", "devices"))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--eps", "1.5"], "eps must be a number in (0, 1]"),
        (["demo", "--layers", "0"], "--layers must be at least 1"),
        (["demo", "--budget", "lots"], "budget must be a number of bytes"),
        (["finetune", "--model", "alexnet9000"], "unknown model 'alexnet9000'"),
        (["finetune", "--data", "/no/such/dir"], "data directory '/no/such/dir' does not exist"),
        (["finetune", "--eps", "0"], "eps must be a number in (0, 1]"),
        (["finetune", "--weights", "/no/such.pt"], "weights file '/no/such.pt' does not exist"),
        (["plan", "--budget", "16"], "is infeasible: training even one layer needs at least"),
        (["plan"], "give --budget"),
        (["measure", "--layers", "nothing.here"], "model has no layer named 'nothing.here'"),
        (["compare", "--methods", "none,tucker"], "method must be one of"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_demo_runs_and_compression_keeps_less(tmp_path, capsys):
    assert main(["demo", *QUICK, "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "hosvd, plan for 2.5MiB" in printed and "kept by autograd" in printed
    plain, hosvd, planned = json.loads((tmp_path / "demo.json").read_text())
    assert hosvd["layer_bytes"] < plain["layer_bytes"] and hosvd["saved_bytes"] < plain["saved_bytes"]
    assert planned["saved_bytes"] <= 2.5 * 2**20
    assert (tmp_path / "demo.png").stat().st_size > 10_000 and (tmp_path / "plan.json").exists()


def test_measure_and_plan_commands(capsys, tmp_path):
    assert main(["measure", "--layers", "last:2", "--batch-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "compressed" in out and "total" in out
    assert main(["measure", "--layers", "last:2", "--batch-size", "8", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["saved_bytes"] < report["vanilla_saved_bytes"]
    assert main(["plan", "--budget", "200KiB", "--batch-size", "8", "--out", str(tmp_path / "p.json")]) == 0
    assert "grad error" in capsys.readouterr().out
    assert json.loads((tmp_path / "p.json").read_text())["predicted_saved_bytes"] <= 200 * 1024
    assert main(["plan", "--device", "stm32h743", "--batch-size", "8"]) == 0
    assert "stm32h743" in capsys.readouterr().out
