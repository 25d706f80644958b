"""Attaching compression to a model (class swap), choosing the layers, the per-layer state."""

from actcomp.attach.select import execution_order, select_layers
from actcomp.attach.swap import compress, compressed_layers, layer_state, restore, stats, suspended

__all__ = ["compress", "compressed_layers", "execution_order", "layer_state", "restore", "select_layers", "stats", "suspended"]
