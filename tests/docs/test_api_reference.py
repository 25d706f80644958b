"""The API reference (docs/api.md) documents everything ``import actcomp`` exports, each name
through one mkdocstrings directive (``::: actcomp.name`` or the full path of the same object),
and nothing that is not exported (issue 24)."""

import importlib
import re
from pathlib import Path

import actcomp

API = Path(__file__).resolve().parents[2] / "docs" / "api.md"


def documented() -> dict[str, object]:
    """The objects the directives of docs/api.md name, by their last dotted part."""
    objects = {}
    for path in re.findall(r"^::: ([\w.]+)$", API.read_text(), re.M):
        module, _, name = path.rpartition(".")
        objects[name] = getattr(importlib.import_module(module), name)
    return objects


def test_every_export_is_documented_once():
    objects = documented()
    assert sorted(objects) == sorted(actcomp.__all__)
    for name, obj in objects.items():
        assert obj is getattr(actcomp, name), name
