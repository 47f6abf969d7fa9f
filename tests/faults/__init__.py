"""The fault registry: every planted fault, the suite meant to catch it, and how that suite must fail.

A fault is one plausible bug, planted either as a backend (the reference with one change, registered under
the fault's name) or as a patch into shared code (applied around the inner run). The tests that run the
registry plant each fault alone, run the suite meant for it in process (pytester), and assert that the
suite fails with a message naming the fault's area. Modules in this package each hold the faults of one
area (or one escape class) in a list named FAULTS; ALL gathers them.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Callable

import pytest


@dataclass(frozen=True)
class Fault:
    name: str                 # kebab-case; also the planted backend's registry name
    area: str                 # the claim it breaks: kv-cache, flash-attention, speculative, sampling,
                              # cross-backend, quantization, batching, harness
    what: str                 # one line: the bug, as an engineer would describe it
    suite: str                # the suite meant to catch it, relative to the repository root
    selection: str            # pytest -k expression: the tests meant to catch it
    message: str              # fnmatch pattern a line of the failure output must match (it names the area)
    backend: type | None = None                                 # a planted backend, or
    patch: Callable[[pytest.MonkeyPatch], None] | None = None   # a patch into shared code
    base_backend: str = "torch"                                 # the backend a patch runs on; the reference a
                                                                # planted backend is derived from
    args: tuple[str, ...] = field(default_factory=tuple)        # extra options for the inner run
    outcomes: dict[str, int] | None = None                      # the exact outcome counts of the selection, where
                                                                # they say more than "some test failed"
    escapes: str | None = None                                  # why the suite meant for it misses it (a known gap)

    def __post_init__(self):
        if (self.backend is None) == (self.patch is None):
            raise ValueError(f"fault {self.name}: give exactly one of backend= or patch=")


def all_faults() -> list[Fault]:
    """Every fault of every module in this package, in a stable order (module, then listing order)."""
    faults = []
    for module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
        faults += importlib.import_module(f"{__name__}.{module}").FAULTS
    names = [f.name for f in faults]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ValueError(f"fault names must be unique: {', '.join(duplicated)}")
    return faults
