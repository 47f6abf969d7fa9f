"""Each fault of the escape classes (tests/faults/escapes.py) is caught by the suite meant for it, on its own, with a
message naming its area; the reference passes the same selections."""
from __future__ import annotations

from pathlib import Path

import pytest

from backends.registry import get_backend
from tests.faults import Fault
from tests.faults.escapes import FAULTS

ROOT = Path(__file__).resolve().parents[1]


def run_suite(pytester: pytest.Pytester, fault: Fault, backend: str) -> pytest.RunResult:
    return pytester.runpytest_inprocess(str(ROOT / fault.suite), "-m", "exactness", "--backend", backend,
                                        "-k", fault.selection, "-p", "no:randomly", "-q", *fault.args)


def plant(fault: Fault, register_backend, monkeypatch: pytest.MonkeyPatch) -> str:
    """Plant the fault; the name of the backend to run the suite on."""
    if fault.backend is not None:
        return register_backend(fault.backend)
    fault.patch(monkeypatch)
    return fault.base_backend


@pytest.mark.parametrize("fault", FAULTS, ids=lambda fault: fault.name)
def test_fault_is_caught_by_its_suite(pytester, register_backend, monkeypatch, fault):
    result = run_suite(pytester, fault, plant(fault, register_backend, monkeypatch))
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) > 0, f"{fault.name} escaped {fault.suite} -k {fault.selection!r}: {outcomes}"
    result.stdout.fnmatch_lines([fault.message])


# one reference run per distinct selection (several faults are caught by the same test)
SELECTIONS = list({(f.suite, f.selection, f.args, f.base_backend): f for f in FAULTS}.values())


@pytest.mark.parametrize("fault", SELECTIONS, ids=lambda fault: fault.name)
def test_reference_passes_the_same_selection(pytester, register_backend, fault):
    """The unchanged base backend, under another name as the planted ones are (the cross-backend suite compares
    every backend but the reference with the reference)."""
    base = get_backend(fault.base_backend)
    unchanged = register_backend(type(f"Unchanged{base.__name__}", (base,), {"name": f"{base.name}-unchanged"}))
    result = run_suite(pytester, fault, unchanged)
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed", 0) > 0 and not outcomes.get("failed") and not outcomes.get("errors"), outcomes
