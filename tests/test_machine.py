"""harness.machine: the last-level cache size from sysfs and the measured read bandwidth."""
from __future__ import annotations

import pytest

from harness import machine


def fake_cache(root, index, level, kind, size):
    directory = root / f"index{index}"
    directory.mkdir()
    (directory / "level").write_text(f"{level}\n")
    (directory / "type").write_text(f"{kind}\n")
    (directory / "size").write_text(f"{size}\n")


@pytest.fixture
def sysfs(tmp_path, monkeypatch):
    monkeypatch.setattr(machine, "CPU_CACHES", tmp_path)
    machine.last_level_cache_bytes.cache_clear()
    yield tmp_path
    machine.last_level_cache_bytes.cache_clear()


def test_last_level_cache_is_the_highest_data_level(sysfs):
    fake_cache(sysfs, 0, 1, "Data", "48K")
    fake_cache(sysfs, 1, 1, "Instruction", "32K")
    fake_cache(sysfs, 2, 2, "Unified", "2M")
    fake_cache(sysfs, 3, 3, "Unified", "32768K")
    assert machine.last_level_cache_bytes() == 32 * 2**20
    assert machine.fits_in_last_level_cache(32 * 2**20) is True
    assert machine.fits_in_last_level_cache(32 * 2**20 + 1) is False


def test_no_sysfs_caches_means_unknown(sysfs):
    assert machine.last_level_cache_bytes() is None
    assert machine.fits_in_last_level_cache(1) is None


def test_read_bandwidth_times_each_repeat():
    measured = machine.measure_read_bandwidth(buffer_bytes=2**20, repeats=3)
    assert measured.buffer_bytes == 2**20 and len(measured.samples) == 3
    assert min(measured.samples) <= measured.bytes_per_s <= max(measured.samples)
    assert measured.bytes_per_s > 1e6  # a megabyte per second is far below any machine this runs on


def test_bad_buffer_is_refused():
    with pytest.raises(ValueError, match="buffer_bytes 4 and repeats 1"):
        machine.measure_read_bandwidth(buffer_bytes=4, repeats=1)
