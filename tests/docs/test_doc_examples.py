"""Every Python example of the README and the documentation site runs (issue 24).

The ```python blocks of one Markdown file run in order in one namespace (mktestdocs'
``check_md_file(memory=True)``), in a temporary working directory, so a guide reads as one
session. A block that cannot run offline is fenced as ```py instead and says so beside it
("not run"): the last test holds that rule."""

import re
from pathlib import Path

import pytest
import torch
from mktestdocs import grab_code_blocks
from mktestdocs.__main__ import check_md_file

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
WITH_PYTHON = [page for page in PAGES if grab_code_blocks(page.read_text(), lang="python")]


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def test_the_pages_hold_python_examples():
    names = {page_id(page) for page in WITH_PYTHON}
    assert {"README.md", "docs/guides/getting-started.md", "docs/guides/fit.md"} <= names, names


@pytest.mark.parametrize("page", WITH_PYTHON, ids=page_id)
def test_python_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    check_md_file(page, memory=True)


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_an_example_not_run_says_so(page):
    """A ```py block (Python the tests do not run) has "not run" in the three lines before it."""
    lines = page.read_text().splitlines()
    for i, line in enumerate(lines):
        if re.fullmatch(r"\s*```py\s*", line):
            before = " ".join(lines[max(0, i - 3):i])
            assert "not run" in before, f"{page_id(page)}:{i + 1}: say why this example is not run"
