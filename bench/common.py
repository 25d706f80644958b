"""Shared by the benchmark scripts: timing, machine description, BENCHMARKS.md sections."""

from __future__ import annotations

import datetime
import os
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
_LOAD_AT_START = os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 3) -> list[float]:
    """Wall times of ``fn`` in milliseconds, synchronising the device around each call."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def interleaved_medians(fns: dict[str, Callable[[], object]], device: torch.device, rounds: int, per_round: int) -> dict[str, float]:
    """Median time of each function, measured in alternating rounds so drift hits all alike."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for name, fn in fns.items():
        time_ms(fn, device, 1, warmup=3)
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name] += time_ms(fn, device, per_round, warmup=0)
    return {name: statistics.median(values) for name, values in samples.items()}


def machine(device: torch.device) -> str:
    """Device, torch version, date; on the host the thread count and the 1-minute load average
    at the start and end of the run (the benchmark host is shared with other work)."""
    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        threads = torch.get_num_threads()
        what = f"{platform.processor() or platform.machine()}, {threads} thread{'s' if threads != 1 else ''}"
        if _LOAD_AT_START is not None:
            what += f", load average {_LOAD_AT_START:.1f} at the start and {os.getloadavg()[0]:.1f} at the end"
    return f"{what}; torch {torch.__version__}; {datetime.date.today().isoformat()}"


def write_section(key: str, text: str) -> None:
    """Put ``text`` between the markers of section ``key`` in BENCHMARKS.md (append if new)."""
    begin, end = f"<!-- begin {key} -->", f"<!-- end {key} -->"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    current = BENCHMARKS.read_text() if BENCHMARKS.exists() else "# Benchmarks\n\nWritten by the scripts in bench/; every figure is a median over repeated runs.\n"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    current = pattern.sub(lambda _: block, current) if pattern.search(current) else f"{current.rstrip()}\n\n{block}\n"
    BENCHMARKS.write_text(current)


def publish(key: str, text: str, write: bool) -> None:
    """Print a section and, with ``write``, put it into BENCHMARKS.md."""
    print(text)
    if write:
        write_section(key, text)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
