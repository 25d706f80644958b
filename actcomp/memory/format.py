"""Aligned plain-text tables for reports printed to a terminal."""

from __future__ import annotations

from typing import Sequence


def aligned_table(header: Sequence[str], rows: Sequence[Sequence[str]], footer: Sequence[str] | None = None) -> str:
    """Columns padded to their widest cell, a dashed rule under the header, and an optional
    footer row (a total) set off by a second rule."""
    body = [list(r) for r in rows] + ([list(footer)] if footer is not None else [])
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    rule = fmt.format(*("-" * w for w in widths))
    lines = [fmt.format(*header), rule, *(fmt.format(*r) for r in rows)]
    if footer is not None:
        lines += [rule, fmt.format(*footer)]
    return "\n".join(line.rstrip() for line in lines)
