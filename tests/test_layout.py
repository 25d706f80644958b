"""The package's layout: the library apart from the application, no import cycles, registries
filled by importing the library alone."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "actcomp"
APP_ONLY = ("sklearn", "matplotlib", "tqdm")  # the application's extra
EXPORT_ONLY = ("onnx", "onnxruntime", "onnxscript")  # the export extra


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level_imports(path: Path) -> set[str]:
    """Modules imported when ``path`` is executed (module level, outside TYPE_CHECKING), as
    full names; ``from a import b`` counts a.b when that is a module of the package."""
    tree = ast.parse(path.read_text())
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found: set[str] = set()

    def visit(body):
        for node in body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                found.add(base)
                for alias in node.names:
                    if (PACKAGE.parent / (base + "." + alias.name).replace(".", "/")).with_suffix(".py").exists() or (
                        PACKAGE.parent / (base + "." + alias.name).replace(".", "/") / "__init__.py"
                    ).exists():
                        found.add(f"{base}.{alias.name}")

    visit(tree.body)
    return {name for name in found if name == "actcomp" or name.startswith("actcomp.")}


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_library_never_imports_the_application():
    offenders = []
    for name, path in MODULES.items():
        if name == "actcomp.app" or name.startswith("actcomp.app."):
            continue
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):  # also imports inside functions
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module]
            offenders += [f"{name} imports {t}" for t in targets if t == "actcomp.app" or t.startswith("actcomp.app.")]
    assert not offenders, offenders


def test_no_import_cycles_between_modules():
    graph = {name: {m for m in top_level_imports(path) if m in MODULES and m != name} for name, path in MODULES.items()}
    state: dict[str, int] = {}
    cycles = []

    def walk(node, trail):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(trail[trail.index(nxt) :] + [nxt])
            elif nxt not in state:
                walk(nxt, trail + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            walk(name, [name])
    assert not cycles, cycles


BLOCKER = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {blocked!r}:
            raise ImportError(f"{{name}} is blocked for this test")
sys.meta_path.insert(0, Block())
"""


@pytest.mark.parametrize("entry", ["import actcomp", "import actcomp.export, actcomp.optim, actcomp.peft"])
def test_library_needs_torch_and_numpy_only(entry):
    """``import actcomp`` (and its subpackages) works without the application's and the export's
    extras: they are imported lazily where used, never at import time."""
    code = BLOCKER.format(blocked=APP_ONLY + EXPORT_ONLY) + entry + "\nimport actcomp, sys\n"
    code += "print(len(actcomp.method_names()), len(actcomp.supported_types()))\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    methods, layers = map(int, done.stdout.split())
    assert methods >= 6 and layers >= 5  # the registries are filled by importing the library alone


def test_registry_plugins_import_their_base_module():
    """Each registry lives in a base module that its plugins import; the package __init__ only
    imports the plugins (so no plugin runs while its registry is half defined)."""
    for package in ("methods", "kernels", "policies"):
        base = f"actcomp.{package}.base"
        assert base in MODULES
        for name, path in MODULES.items():
            if name.startswith(f"actcomp.{package}.") and name != base:
                assert f"actcomp.{package}" not in top_level_imports(path) or name.endswith("__init__"), (
                    f"{name} imports its package's __init__; import {base} instead"
                )


def test_test_files_have_distinct_basenames():
    """The test folders have no __init__.py: pytest imports each test file by its basename, so
    two files of one name in different folders would fail to collect."""
    names = [p.name for p in Path(__file__).resolve().parent.rglob("test_*.py")]
    assert sorted({n for n in names if names.count(n) > 1}) == []


def test_one_conftest():
    """Test files import helpers with ``from conftest import ...``: a conftest.py in a subfolder
    would be the module that name finds for some of them."""
    here = Path(__file__).resolve().parent
    assert [p.relative_to(here).as_posix() for p in here.rglob("conftest.py")] == ["conftest.py"]
