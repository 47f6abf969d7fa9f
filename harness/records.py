"""Result records: one JSON object per checked or measured test, kept as run files that no process rewrites.

Storage, after airspeed velocity and pytest-benchmark's saved runs: every run (every pytest-xdist worker) appends
to a file of its own, `<results>/records/<run id>.jsonl`. Its first line is a header (machine, commit, versions,
options); each later line is one record, written and flushed as its test finishes, so a killed run keeps what
completed. Readers take a set of run files and keep, per (test, model, machine), the latest record; a run whose
test met an environment error (outcome `error`: a file or permission problem, not a finding about the backend)
never hides an earlier decisive outcome. A bad line is skipped with a message naming its file and line.
JSON is strict: non-finite floats are written as the strings "inf", "-inf", "nan".
"""
from __future__ import annotations

import json
import math
import os
import platform
import secrets
import socket
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from functools import cache
from pathlib import Path
from typing import Callable, Iterable, TextIO

import torch

RUN_SUFFIX = ".jsonl"
OUTCOMES = ("passed", "failed", "skipped", "xfailed", "xpassed", "error")
NON_FINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


class RecordsError(ValueError):
    """A records source that cannot be read at all; the message names it."""


@dataclass
class Record:
    suite: str
    tier: str  # exactness or bench
    test: str  # the test's node id
    backend: str | None
    model: str | None
    strategy: dict[str, str]
    params: dict[str, object]
    outcome: str  # one of OUTCOMES
    metrics: dict[str, float] = field(default_factory=dict)
    reason: str | None = None  # why skipped, expected to fail, or met an environment error
    machine: dict[str, object] = field(default_factory=dict)
    commit: str | None = None
    time: str | None = None
    samples: dict[str, list[float]] = field(default_factory=dict)  # repeats behind a metric (the gate's noise test)

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


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("exactbench", "torch", "onnxruntime", "onnx", "transformers", "pytest", "pytest-benchmark"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def _strict(value: object) -> object:
    """JSON that strict readers accept: non-finite floats become strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def _number(value: object) -> float:
    if isinstance(value, str) and value in NON_FINITE:
        return NON_FINITE[value]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"not a number: {value!r}")
    return float(value)


def dumps(obj: dict) -> str:
    return json.dumps(_strict(obj), allow_nan=False, default=str, separators=(",", ":"))


class RunWriter:
    """Appends one run's records to its own file, created with its header on the first record."""

    def __init__(self, records_dir: Path, run_id: str, header: dict[str, object]):
        self.path = records_dir / f"{run_id}{RUN_SUFFIX}"
        self.header = header
        self._file: TextIO | None = None
        self.count = 0

    def append(self, record: Record) -> None:
        if self._file is None:
            # "x": a run id is never reused, so no other run's file is ever opened for writing
            self._file = open(self.path, "x", encoding="utf-8")
            self._file.write(dumps({"run": self.header}) + "\n")
        self._file.write(dumps(asdict(record)) + "\n")
        self._file.flush()  # a killed run keeps every record written so far
        self.count += 1

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def new_run_id(worker: str | None = None, group: str | None = None) -> str:
    """Unique and sortable: UTC time, then the xdist run's shared id and worker, or host, process and a nonce (two
    runs inside one process, as pytester makes, share a pid)."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    if worker:
        return f"{stamp}-{(group or 'xdist')[:8]}-{worker}"
    return f"{stamp}-{socket.gethostname()[:20]}-{os.getpid()}-{secrets.token_hex(3)}"


def run_header(options: dict[str, object]) -> dict[str, object]:
    return {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine_info(),
            "commit": current_commit(), "versions": package_versions(), "argv": sys.argv[1:], "options": options}


def check_writable_dir(path: Path) -> None:
    """Raise OSError (with a readable strerror) unless records can be created under `path`."""
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):
        pass


# --- reading ----------------------------------------------------------------------------------------------

_TEXT = (str,)
_OPTIONAL_TEXT = (str, type(None))
_FIELD_TYPES = {"suite": _TEXT, "tier": _TEXT, "test": _TEXT, "backend": _OPTIONAL_TEXT, "model": _OPTIONAL_TEXT,
                "strategy": (dict,), "params": (dict,), "outcome": _TEXT, "metrics": (dict,),
                "reason": _OPTIONAL_TEXT, "machine": (dict,), "commit": _OPTIONAL_TEXT, "time": _OPTIONAL_TEXT,
                "samples": (dict,)}
_REQUIRED = ("suite", "tier", "test", "backend", "model", "strategy", "params", "outcome")


def parse_record(data: object) -> Record:
    """A Record from one decoded JSON line; ValueError naming what is wrong."""
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - set(_FIELD_TYPES))
    missing = [name for name in _REQUIRED if name not in data]
    if unknown or missing:
        raise ValueError(f"unknown fields {unknown}" if unknown else f"missing fields {missing}")
    for name, value in data.items():
        if not isinstance(value, _FIELD_TYPES[name]):
            raise ValueError(f"field {name!r} is {type(value).__name__}, expected {_FIELD_TYPES[name][0].__name__}")
    if data["outcome"] not in OUTCOMES:
        raise ValueError(f"outcome {data['outcome']!r} is not one of {', '.join(OUTCOMES)}")
    fields = dict(data)
    fields["metrics"] = {str(k): _number(v) for k, v in data.get("metrics", {}).items()}
    # a non-finite parameter (a request rate of inf: all at once) was written as a string too
    fields["params"] = {k: NON_FINITE.get(v, v) if isinstance(v, str) else v for k, v in data["params"].items()}
    samples = data.get("samples", {})
    if not all(isinstance(v, list) for v in samples.values()):
        raise ValueError("samples must map names to lists of numbers")
    fields["samples"] = {str(k): [_number(x) for x in v] for k, v in samples.items()}
    return Record(**fields)


def run_files(sources: Iterable[Path]) -> list[Path]:
    """The run files named by `sources` (files, or directories searched for *.jsonl); RecordsError if one is absent."""
    files = []
    for source in sources:
        if source.is_dir():
            files.extend(sorted(source.glob(f"*{RUN_SUFFIX}")))
        elif source.is_file():
            files.append(source)
        else:
            raise RecordsError(f"{source}: no such run file or directory")
    return files


def read_run(path: Path, on_problem: Callable[[str], None]) -> list[Record]:
    """Every good record of one run file, in file order; each bad line is reported and skipped."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        on_problem(f"{path}: unreadable ({error.strerror}); skipped")
        return []
    records = []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line.decode("utf-8"))
            if number == 1 and isinstance(data, dict) and set(data) == {"run"}:
                continue  # the header
            records.append(parse_record(data))
        except UnicodeDecodeError:
            on_problem(f"{path}:{number}: not UTF-8; line skipped")
        except json.JSONDecodeError as error:
            on_problem(f"{path}:{number}: not JSON ({error.msg}); line skipped")
        except (ValueError, TypeError) as error:
            on_problem(f"{path}:{number}: bad record ({error}); line skipped")
    return records


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def latest(records: Iterable[Record]) -> list[Record]:
    """Per (test, model, machine) the latest record by time (ties: the later read); a record whose outcome is an
    environment error is kept only when no decisive record exists."""
    chosen: dict[tuple, Record] = {}
    for record in sorted(records, key=lambda r: r.time or ""):  # stable: equal times keep their read order
        held = chosen.get(record.key())
        if held is None or record.outcome != "error" or held.outcome == "error":
            chosen[record.key()] = record
    return list(chosen.values())


def load_records(sources: Iterable[Path], on_problem: Callable[[str], None] = _warn) -> list[Record]:
    """The latest record per test, model and machine over the run files in `sources`."""
    return latest(record for path in run_files(sources) for record in read_run(path, on_problem))


def load_all(records_dir: Path, on_problem: Callable[[str], None] = _warn) -> list[Record]:
    """The latest records under `records_dir` (an absent directory holds none)."""
    if not records_dir.is_dir():
        return []
    return load_records([records_dir], on_problem)


def write_atomic(path: Path, text: str) -> None:
    """Write a whole file under a temporary name, then rename: readers never see half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; published files are for every reader
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
