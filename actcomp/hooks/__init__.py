"""Attaching compression to a model (class swap) and choosing the layers."""

from actcomp.hooks.select import execution_order, select_layers
from actcomp.hooks.swap import compress, compressed_layers, restore, stats

__all__ = ["compress", "compressed_layers", "execution_order", "restore", "select_layers", "stats"]
