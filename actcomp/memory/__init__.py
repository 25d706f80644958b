"""Measuring what training keeps in memory, and planning what fits a budget."""

from actcomp.memory.measure import MemoryReport, ModuleMemory, format_bytes, measure
from actcomp.memory.saved import SavedTensors, count_saved

__all__ = ["MemoryReport", "ModuleMemory", "SavedTensors", "count_saved", "format_bytes", "measure"]
