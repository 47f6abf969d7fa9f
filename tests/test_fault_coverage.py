"""The suites are trusted only because they fail on planted faults: each fault of the registry (tests/faults/),
planted alone, makes the suite meant for it fail, with a message that names the fault's area; the reference passes
the same selections. Each outcome is recorded (tier `faults`) for results/fault_coverage.md."""
from __future__ import annotations

import fnmatch
import time
from pathlib import Path

import pytest

from backends import registry

from .faults import Fault, all_faults

REPO = Path(__file__).resolve().parents[1]
FAULTS = all_faults()


def run_selection(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, suite: str, backend: str,
                  selection: str, args: tuple[str, ...]) -> pytest.RunResult:
    """The selection of `suite` on `backend`, in process (the patches and planted backends of this process apply);
    summary lines are not cut to the terminal's width, so a failure's message is on its FAILED line."""
    monkeypatch.setenv("COLUMNS", "1000")
    return pytester.runpytest_inprocess(str(REPO / suite), "-m", "not bench", "--backend", backend, *args,
                                        "-k", selection, "-p", "no:randomly", "-q")


def plant(fault: Fault, monkeypatch: pytest.MonkeyPatch, register_backend) -> str:
    """Plant the fault in this process; returns the backend to run the suite on."""
    if fault.backend is not None:
        return register_backend(fault.backend)
    fault.patch(monkeypatch)
    return fault.base_backend


def failed_tests(result: pytest.RunResult) -> list[str]:
    """The test functions of the FAILED summary lines, each once."""
    names = [line.split("::")[1].split("[")[0].split(" ")[0] for line in result.outlines if line.startswith("FAILED ")]
    return list(dict.fromkeys(names))


def registry_param(fault: Fault):
    marks = [pytest.mark.xfail(strict=True, reason=f"expected to escape: {fault.escapes}")] if fault.escapes else []
    return pytest.param(fault, id=fault.name, marks=marks)


@pytest.mark.faults
@pytest.mark.parametrize("fault", [registry_param(f) for f in FAULTS])
def test_the_suite_meant_for_the_fault_catches_it(pytester, monkeypatch, register_backend, record, fault):
    record.params(fault=fault.name, area=fault.area, what=fault.what, suite_meant=fault.suite,
                  selection=fault.selection, message=fault.message, escapes=fault.escapes or "")
    backend = plant(fault, monkeypatch, register_backend)
    started = time.perf_counter()
    result = run_selection(pytester, monkeypatch, fault.suite, backend, fault.selection, fault.args)
    outcomes = result.parseoutcomes()
    caught_by = failed_tests(result)
    matched = fnmatch.filter(result.outlines, fault.message)
    record(run_s=time.perf_counter() - started, failed=outcomes.get("failed", 0), passed=outcomes.get("passed", 0),
           caught=float(bool(caught_by and matched)))
    record.params(caught_by=", ".join(caught_by), matched=matched[0][:300] if matched else "")
    output = "\n".join(result.outlines[-40:])
    assert caught_by, f"{fault.name}: {fault.suite} -k '{fault.selection}' did not fail: {outcomes}\n{output}"
    assert matched, f"{fault.name}: no line of the failure matches {fault.message!r}\n{output}"
    assert "error" not in outcomes and "errors" not in outcomes, f"{fault.name}: the run errored\n{output}"
    if fault.outcomes is not None:
        result.assert_outcomes(**fault.outcomes)


def reference_runs() -> dict[tuple, list[str]]:
    """The faults' selections grouped by what the reference runs them as: (suite, reference backend, options)."""
    groups: dict[tuple, list[str]] = {}
    for fault in FAULTS:
        groups.setdefault((fault.suite, fault.base_backend, fault.args), []).append(fault.selection)
    return groups


@pytest.mark.faults
@pytest.mark.parametrize("suite, reference, args", list(reference_runs()),
                         ids=lambda value: value if isinstance(value, str) else " ".join(value) or "-")
def test_the_reference_passes_the_same_selections(pytester, monkeypatch, register_backend, suite, reference, args):
    selection = " or ".join(f"({s})" for s in reference_runs()[(suite, reference, args)])
    # run as a copy under another name, as every planted backend is: a suite may skip the reference by name (the
    # cross-backend suite compares every other backend with torch)
    original = registry.get_backend(reference)
    copy = register_backend(type(f"Copy{original.__name__}", (original,), {"name": f"{reference}-copy"}))
    result = run_selection(pytester, monkeypatch, suite, copy, selection, args)
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed", 0) > 0 and set(outcomes) <= {"passed", "skipped", "xfailed", "deselected"}, (
        f"the reference fails {suite} -k '{selection}': {outcomes}\n" + "\n".join(result.outlines[-40:]))


def test_the_registry_has_a_fault_for_every_area_and_a_suite_that_exists():
    areas = {"kv-cache", "flash-attention", "speculative", "sampling", "cross-backend", "cross-implementation",
             "quantization", "batching", "harness"}
    assert {f.area for f in FAULTS} >= areas, f"areas without a fault: {areas - {f.area for f in FAULTS}}"
    assert len(FAULTS) >= 30
    missing = sorted({f.suite for f in FAULTS if not (REPO / f.suite).is_file()})
    assert not missing, f"faults name suites that do not exist: {missing}"


def test_a_mutant_count_below_one_is_a_one_line_usage_error(capsys):
    from harness.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["faults", "--mutants-per-module", "0"])
    assert exit_info.value.code == 2
    assert "--mutants-per-module 0: expected a positive number of mutants" in capsys.readouterr().err
