"""This machine's memory ceilings: its measured read bandwidth and its last-level cache size.

Decode of a small model reads every weight once per token, so weight bytes x tokens/s (achieved bandwidth) is
judged against the rate this machine can read memory at all. That rate is measured, not taken from a data sheet:
one thread sums a buffer far larger than the last-level cache (so every read comes from DRAM), median of repeats.
Weights that fit in the last-level cache are read from cache, not DRAM; there the DRAM figure is the wrong ceiling,
which `fits_in_last_level_cache` tells.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

CPU_CACHES = Path("/sys/devices/system/cpu/cpu0/cache")
MIN_BUFFER_BYTES = 256 * 2**20
BUFFER_TIMES_CACHE = 8  # the buffer is at least this many times the last-level cache
READ_REPEATS = 7


@dataclass(frozen=True)
class ReadBandwidth:
    bytes_per_s: float  # median over the repeats
    samples: tuple[float, ...]  # bytes/s of each repeat
    buffer_bytes: int

    def as_metrics(self) -> dict[str, float]:
        return {"machine_read_GBps": self.bytes_per_s / 1e9, "machine_read_buffer_bytes": float(self.buffer_bytes)}


def _size_bytes(text: str) -> int:
    """sysfs cache sizes read like '32768K' or '2M'."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    text = text.strip()
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


@cache
def last_level_cache_bytes() -> int | None:
    """The size of the largest-level data (or unified) cache cpu0 sees; None where Linux sysfs does not say."""
    levels = {}
    for index in CPU_CACHES.glob("index*"):
        try:
            if (index / "type").read_text().strip() == "Instruction":
                continue
            levels[int((index / "level").read_text())] = _size_bytes((index / "size").read_text())
        except (OSError, ValueError, KeyError):
            continue
    return levels[max(levels)] if levels else None


def fits_in_last_level_cache(nbytes: int) -> bool | None:
    llc = last_level_cache_bytes()
    return None if llc is None else nbytes <= llc


def measure_read_bandwidth(buffer_bytes: int | None = None, repeats: int = READ_REPEATS) -> ReadBandwidth:
    """Bytes per second one thread reads, summing a float64 buffer (default: 8x the last-level cache, >= 256 MiB)."""
    if buffer_bytes is None:
        buffer_bytes = max(MIN_BUFFER_BYTES, BUFFER_TIMES_CACHE * (last_level_cache_bytes() or 0))
    if buffer_bytes < 8 or repeats < 1:
        raise ValueError(f"buffer_bytes {buffer_bytes} and repeats {repeats}: accepted buffer >= 8 bytes, repeats >= 1")
    buffer = np.ones(buffer_bytes // 8, dtype=np.float64)  # written once, so every page is resident before timing
    buffer.sum()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        buffer.sum()
        samples.append(buffer.nbytes / (time.perf_counter() - start))
    return ReadBandwidth(statistics.median(samples), tuple(samples), buffer.nbytes)


@cache
def read_bandwidth() -> ReadBandwidth:
    """This process's one measurement (a run measures once; every record that needs it reuses it)."""
    return measure_read_bandwidth()
