"""Every command of the documented command-line table runs as written, on small settings
(issue 22), and so does every `actcomp` command of a ```bash or ```console block of the README
and the documentation site (issue 24): the table and the blocks are read from the Markdown
files, so a command added there without small settings here, or one the parser lacks, fails
this test. The table lives in the command-line guide, the Reliability table in the reliability
guide (the README links to both)."""

import json
import re
import shlex
from pathlib import Path

import pytest

from actcomp.app.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
COMMAND_LINE = ROOT / "docs" / "guides" / "command-line.md"
RELIABILITY = ROOT / "docs" / "guides" / "reliability.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]

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
    """The commands in the first column of the command-line guide's table, as argv lists."""
    text = COMMAND_LINE.read_text()
    section = text.split("\n## Commands\n", 1)[1].split("\n## ", 1)[0]
    rows = [re.match(r"\| `actcomp ([^`]+)` \|", line) for line in section.splitlines()]
    return [row.group(1).split() for row in rows if row]


def test_the_table_names_every_command_of_the_parser():
    parser = build_parser()
    choices = next(a for a in parser._actions if a.dest == "command").choices
    commands = [argv[0] for argv in table_commands()]
    assert sorted(commands) == sorted(choices)
    assert set(commands) <= set(SMALL), f"give the new command(s) {sorted(set(commands) - set(SMALL))} small settings here"


def with_small_settings(argv: list[str], tmp_path: Path) -> list[str]:
    """``argv`` and those of its command's small settings that it does not give itself."""
    small = [a.format(tmp=tmp_path) for a in SMALL[argv[0]]]
    added: list[str] = []
    for i, arg in enumerate(small):
        if arg.startswith("--") and arg not in argv:
            value = small[i + 1:i + 2]
            added += [arg, *(value if value and not value[0].startswith("--") else [])]
    return [*argv, *added]


def block_commands() -> list[tuple[str, list[list[str]]]]:
    """Per ```bash / ```console block of the README and the site that runs ``actcomp``: where it
    is (``page:line``) and its commands as argv lists, in order (``$ `` prompts and what comes
    before ``&&`` dropped). A block whose only commands are table commands as the table writes
    them is left to the table's test, which runs those already."""
    table = table_commands()
    blocks = []
    for page in PAGES:
        text = page.read_text()
        for match in re.finditer(r"^```(?:bash|console|sh)\n(.*?)^```", text, re.M | re.S):
            commands = []
            for line in match.group(1).splitlines():
                for part in line.removeprefix("$ ").split("&&"):
                    words = shlex.split(part, comments=True)
                    if words[:1] == ["actcomp"]:
                        commands.append(words[1:])
            if commands and any(argv not in table for argv in commands):
                where = f"{page.relative_to(ROOT)}:{text[:match.start()].count(chr(10)) + 1}"
                blocks.append((where, commands))
    return blocks


def test_the_pages_hold_command_blocks():
    assert any(where.startswith("docs/guides/command-line.md") for where, _ in block_commands())


@pytest.mark.slow
@pytest.mark.parametrize("where, commands", block_commands(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_command_block_runs_on_small_settings(where, commands, tmp_path, capsys, monkeypatch):
    """The commands of one block run in order in one directory (a later one may read what an
    earlier one wrote), each with its command's small settings where it gives none."""
    monkeypatch.chdir(tmp_path)
    for argv in commands:
        if "--help" in argv or "-h" in argv:
            with pytest.raises(SystemExit) as exit_:
                main(argv)
            assert exit_.value.code == 0, " ".join(argv)
            continue
        assert main(with_small_settings(argv, tmp_path)) == 0, f"{where}: actcomp {' '.join(argv)}: {capsys.readouterr().err}"


@pytest.mark.slow
@pytest.mark.parametrize("argv", table_commands(), ids=lambda argv: " ".join(argv))
def test_every_command_of_the_table_runs_as_written(argv, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(with_small_settings(argv, tmp_path)) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    for name in WROTE.get(argv[0], []):
        assert (tmp_path / name).is_file(), name
    if argv[0] in PRINTED:
        assert PRINTED[argv[0]] in out
    if argv[0] == "finetune":
        assert json.loads((tmp_path / "run" / "config.json").read_text())["epochs"] == 1


def test_the_reliability_section_names_tests_that_exist():
    """Every test the reliability guide's table names (``path::name``, ``::name`` for another
    of the same file, a trailing ``*`` for several) is a test function of that file."""
    root = ROOT
    text = RELIABILITY.read_text()
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
