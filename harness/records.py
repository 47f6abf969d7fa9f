"""Result records: one JSON object per measured or checked test, merged into one set across runs and machines.

Files are results/records/<suite>.json, each a JSON list. A run replaces the records it re-measured (same
test, model and machine) and keeps the rest; files are written to a temporary name, then renamed, so an
interrupted run never leaves a half-written file.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path

import torch


class RecordsError(ValueError):
    """A records file that cannot be read; the message names the file."""


@dataclass
class Record:
    suite: str
    tier: str  # exactness or bench
    test: str  # the test's node id
    backend: str | None
    model: str | None
    strategy: dict[str, str]
    params: dict[str, object]
    outcome: str  # passed, failed, skipped, xfailed, xpassed
    metrics: dict[str, float] = field(default_factory=dict)
    reason: str | None = None  # why skipped or expected to fail
    machine: dict[str, object] = field(default_factory=dict)
    commit: str | None = None
    time: str | None = None

    def key(self) -> tuple:
        return (self.test, self.model, self.machine.get("id"))


@cache
def machine_info() -> dict[str, object]:
    """What the figures were measured on; `id` separates machines when records merge."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    cores = os.cpu_count()
    return {
        "id": f"{cpu} x{cores}" + (f" + {gpu}" if gpu else ""),
        "cpu": cpu,
        "cores": cores,
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


@cache
def current_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def read_records(path: Path) -> list[Record]:
    try:
        data = json.loads(path.read_text())
    except OSError as error:
        raise RecordsError(f"{path}: unreadable ({error.strerror})") from None
    except json.JSONDecodeError as error:
        raise RecordsError(f"{path}: corrupt records file ({error.msg} at line {error.lineno})") from None
    if not isinstance(data, list):
        raise RecordsError(f"{path}: corrupt records file (expected a JSON list of records)")
    try:
        return [Record(**item) for item in data]
    except TypeError as error:
        raise RecordsError(f"{path}: corrupt records file ({error})") from None


def load_all(records_dir: Path) -> list[Record]:
    """Every record under `records_dir` (an absent directory holds none)."""
    if not records_dir.is_dir():
        return []
    return [record for path in sorted(records_dir.glob("*.json")) for record in read_records(path)]


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def merge_into(records_dir: Path, records: list[Record]) -> list[Path]:
    """Merge new records into their suites' files; returns the files written."""
    by_suite: dict[str, list[Record]] = {}
    for record in records:
        by_suite.setdefault(record.suite, []).append(record)
    written = []
    for suite, new in sorted(by_suite.items()):
        path = records_dir / f"{suite}.json"
        kept = read_records(path) if path.exists() else []
        replaced = {record.key() for record in new}
        merged = [record for record in kept if record.key() not in replaced] + new
        write_atomic(path, json.dumps([asdict(r) for r in merged], indent=1, default=str) + "\n")
        written.append(path)
    return written
