"""Method ``"none"``: plain autograd, for comparisons (``stats`` still reports the input's bytes)."""

from __future__ import annotations

from actcomp.methods.base import Compressor, InputLayout, register_method


@register_method
class Plain(Compressor):
    """The layer runs its own forward under plain autograd and keeps its input."""

    name = "none"
    settings = ()
    knob = None

    def setting(self) -> str:
        return "plain"

    def runs_plain(self, layout: InputLayout) -> bool:
        return True
