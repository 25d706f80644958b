"""Every command of the README's command-line table runs as written, on small settings
(issue 22): the table is read from README.md, so a command added there without small settings
here, or one the parser lacks, fails this test."""

import json
import re
from pathlib import Path

import pytest

from actcomp.app.cli import build_parser, main

README = Path(__file__).resolve().parents[2] / "README.md"

# What each command gets beside what the table writes: small sizes and epochs (the commands'
# own defaults take minutes), and an --out inside the test's directory.
SMALL = {
    "demo": ["--epochs", "1", "--pretrain-epochs", "1", "--no-every", "--batch-size", "128", "--no-progress", "--out", "{tmp}/demo"],
    "finetune": ["--size", "16", "--epochs", "1", "--batch-size", "128", "--layers", "last:2", "--no-progress", "--out", "{tmp}/run"],
    "measure": ["--size", "16", "--batch-size", "8", "--layers", "last:2"],
    "plan": ["--size", "16", "--batch-size", "8", "--layers", "last:2", "--budget", "200KiB", "--out", "{tmp}/plan.json"],
    "compare": ["--methods", "none,hosvd", "--max-layers", "1", "--epochs", "1", "--pretrain-epochs", "1", "--batch-size", "128",
                "--no-progress", "--out", "{tmp}/compare"],
    "export": ["--size", "16", "--out", "{tmp}/export"],
    "devices": [],
}

# What each command must have written (under the test's directory) or printed.
WROTE = {
    "demo": ["demo/demo.json", "demo/plan.json", "demo/demo.png"],
    "finetune": ["run/config.json", "run/metrics.json", "run/checkpoint.pt", "run/model.pt"],
    "plan": ["plan.json"],
    "compare": ["compare/compare.csv", "compare/compare.png"],
    "export": ["export/model.onnx", "export/memory_plan.json"],
}
PRINTED = {"measure": "total", "devices": "stm32h743"}


def table_commands() -> list[list[str]]:
    """The commands in the first column of the README's "Command line" table, as argv lists."""
    text = README.read_text()
    section = text.split("\n## Command line\n", 1)[1].split("\n## ", 1)[0]
    rows = [re.match(r"\| `actcomp ([^`]+)` \|", line) for line in section.splitlines()]
    return [row.group(1).split() for row in rows if row]


def test_the_table_names_every_command_of_the_parser():
    parser = build_parser()
    choices = next(a for a in parser._actions if a.dest == "command").choices
    commands = [argv[0] for argv in table_commands()]
    assert sorted(commands) == sorted(choices)
    assert set(commands) <= set(SMALL), f"give the new command(s) {sorted(set(commands) - set(SMALL))} small settings here"


@pytest.mark.slow
@pytest.mark.parametrize("argv", table_commands(), ids=lambda argv: " ".join(argv))
def test_every_command_of_the_table_runs_as_written(argv, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    small = [a.format(tmp=tmp_path) for a in SMALL[argv[0]]]
    assert main([*argv, *small]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    for name in WROTE.get(argv[0], []):
        assert (tmp_path / name).is_file(), name
    if argv[0] in PRINTED:
        assert PRINTED[argv[0]] in out
    if argv[0] == "finetune":
        assert json.loads((tmp_path / "run" / "config.json").read_text())["epochs"] == 1


def test_the_reliability_section_names_tests_that_exist():
    """Every test the README's Reliability table names (``path::name``, ``::name`` for another
    of the same file, a trailing ``*`` for several) is a test function of that file."""
    root = README.parent
    text = README.read_text()
    section = text.split("\n## Reliability\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| **")]
    assert len(rows) >= 10
    for row in rows:
        held_by = row.rstrip(" |").rsplit(" | ", 1)[1]
        refs = re.findall(r"`([^`]+)`", held_by)
        assert refs, row[:80]
        current = None
        for ref in refs:
            path, _, name = ref.partition("::")
            current = path or current
            assert current and (root / current).is_file(), ref
            if name:
                source = (root / current).read_text()
                pattern = re.escape(name[:-1]) + r"\w*" if name.endswith("*") else re.escape(name) + r"\b"
                assert re.search(r"^def " + pattern, source, re.M), f"{current}::{name}"
