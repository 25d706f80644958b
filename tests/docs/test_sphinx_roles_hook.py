"""The site's mkdocs hook shows Sphinx roles of the docstrings as inline code (issue 24)."""

import importlib.util
from pathlib import Path

HOOK = Path(__file__).resolve().parents[2] / "docs" / ".hooks" / "sphinx_roles.py"


def load_hook():
    spec = importlib.util.spec_from_file_location("sphinx_roles", HOOK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_roles_become_code_shortened_where_the_role_says_so():
    hook = load_hook()
    html = "see :func:<code>~actcomp.core.batch.call_model</code>, :class:<code>actcomp.Plan</code> and :meth:<code>~FitChoice.levers()</code>"
    assert hook.on_page_content(html) == "see <code>call_model</code>, <code>actcomp.Plan</code> and <code>levers()</code>"
