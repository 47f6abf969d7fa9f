"""harness.memory: the peak resident memory of a callable, in a fresh spawned child."""
from __future__ import annotations

import pytest

from harness.memory import MemoryMeasurementError, peak_rss_in_child

MIB = 2**20


def make_buffer(mib: int) -> bytearray:
    return bytearray(mib * MIB)  # zero-filled: every page is touched


def touch_and_drop(buffer: bytearray) -> None:
    copy = bytes(buffer)  # a second buffer of the same size, alive until return
    assert len(copy) == len(buffer)


def fail(message: str) -> None:
    raise ValueError(message)


def test_peak_above_setup_counts_what_fn_allocates():
    peak = peak_rss_in_child(touch_and_drop, 64, setup=make_buffer)
    assert peak.baseline_bytes > 64 * MIB  # the setup's buffer is resident before fn runs
    # within 4 MiB: the interpreter's own small allocations come and go meanwhile
    assert abs(peak.extra_bytes - 64 * MIB) < 4 * MIB, f"extra {peak.extra_bytes / MIB:.1f} MiB for a 64 MiB copy"


def test_error_in_the_child_is_reported():
    with pytest.raises(MemoryMeasurementError, match="ValueError: planted"):
        peak_rss_in_child(fail, "planted")
