"""Measuring what training keeps in memory."""

from actcomp.memory.saved import SavedTensors, count_saved

__all__ = ["SavedTensors", "count_saved"]
