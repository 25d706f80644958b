import json
import subprocess
import sys

import pytest

from actcomp.cli import main


def test_help_runs():
    result = subprocess.run([sys.executable, "-m", "actcomp.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "demo" in result.stdout


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--eps", "1.5"], "eps must be a number in (0, 1]"),
        (["demo", "--methods", "none,tucker"], "method must be one of"),
        (["demo", "--layers", "0"], "--layers must be at least 1"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_demo_runs_and_compression_keeps_less(tmp_path, capsys):
    out = tmp_path / "rows.json"
    argv = ["demo", "--epochs", "1", "--pretrain-epochs", "1", "--no-progress", "--methods", "none,hosvd", "--json", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "hosvd" in printed and "kept by autograd" in printed
    plain, hosvd = json.loads(out.read_text())
    assert hosvd["layer_bytes"] < plain["layer_bytes"]
    assert hosvd["saved_bytes"] < plain["saved_bytes"]
