"""The mutation score of backends/ and harness/oracles.py: mutmut (the `faults` extra) mutates the modules that
pyproject.toml's [tool.mutmut] names, and each mutant is judged by the tests of the selection there that run its
function (mutmut maps them on a first, clean run).

The full set is thousands of mutants at seconds to minutes each; a run takes a fixed, seeded sample of each
module's mutants, so the score is an estimate whose sample the page names. Each module's tally becomes a record
(tier `mutation`) beside the fault registry's, and results/fault_coverage.md shows them.
"""
from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

from .records import Record, RunWriter, current_commit, machine_info, new_run_id, run_header

SUITE = "fault_coverage"
SEED = 13
PER_MODULE = 10  # mutants sampled from each module (all of a module with fewer)
MUTANTS_DIR = Path("mutants")  # where mutmut works, under the repository root (gitignored)
# a mutant every module has, cheap to run: the first run generates every mutant and maps the tests to functions
FIRST_MUTANT = "harness.oracles.x_chi_square_pvalue__mutmut_1"
# mutmut's verdicts that count as not killed: a timeout or an unexplained exit is no test failing
SURVIVING = ("survived", "timeout", "suspicious")


def module_of(meta: Path) -> str:
    """mutants/harness/oracles.py.meta -> harness/oracles.py"""
    return str(meta.relative_to(MUTANTS_DIR)).removesuffix(".meta")


def exit_codes() -> dict[str, dict[str, int | None]]:
    """Each mutated module's mutants and mutmut's exit code for each (None: not run)."""
    return {module_of(meta): json.loads(meta.read_text())["exit_code_by_key"]
            for meta in sorted(MUTANTS_DIR.rglob("*.meta"))}


def sample(codes: dict[str, dict[str, int | None]], per_module: int, seed: int) -> dict[str, list[str]]:
    """A fixed, seeded sample of each module's mutants (sorted names, so the sample depends on the code only)."""
    rng = random.Random(seed)
    return {module: sorted(rng.sample(sorted(names), min(per_module, len(names))))
            for module, names in codes.items() if names}


def run_mutmut(names: list[str]) -> int:
    return subprocess.run([sys.executable, "-m", "mutmut", "run", *names]).returncode


def status(code: int | None) -> str:
    from mutmut.stats import status_by_exit_code

    return status_by_exit_code[code]


def mutation_records(codes: dict[str, dict[str, int | None]], chosen: dict[str, list[str]], population: dict[str, int],
                     seconds: float, per_module: int, seed: int) -> list[Record]:
    from mutmut.configuration import config

    tests = " ".join(config().pytest_add_cli_args_test_selection)
    now = datetime.now(timezone.utc).isoformat(timespec="microseconds")
    records = []
    for module, names in chosen.items():
        results = {name: codes[module][name] for name in names}
        counts = Counter(status(code) for code in results.values())
        survived = sorted(name for name, code in results.items() if status(code) in SURVIVING)
        records.append(Record(
            suite=SUITE, tier="mutation", test=f"mutmut::{module}", backend=None, model=None, strategy={},
            params={"module": module, "survived": " ".join(survived), "tests": f"pytest {tests}",
                    "tool": f"mutmut {version()}", "sample": f"{per_module} per module (seed {seed}) of "
                                                            f"{sum(population.values())} generated"},
            outcome="passed" if not counts["not checked"] else "error",
            metrics={"mutants": len(names), "population": population[module], "killed": counts["killed"],
                     "survived": sum(counts[s] for s in SURVIVING),
                     "timeout": counts["timeout"], "no_tests": counts["no tests"], "run_s": seconds},
            reason=f"{counts['not checked']} mutants not run" if counts["not checked"] else None,
            machine=machine_info(), commit=current_commit(), time=now))
    return records


def version() -> str:
    from importlib.metadata import version as package_version

    return package_version("mutmut")


def run_mutation(results_dir: Path, per_module: int = PER_MODULE, seed: int = SEED) -> int:
    """Generate the mutants, run a seeded sample, and append one record per module to a run file of its own."""
    try:
        import mutmut  # noqa: F401
    except ImportError:
        print("error: mutmut is not installed: pip install -c constraints.txt -e '.[faults]'", file=sys.stderr)
        return 2
    started = time.perf_counter()
    status = run_mutmut([FIRST_MUTANT])
    if status != 0:
        print(f"error: mutmut run ended with status {status}", file=sys.stderr)
        return status
    codes = exit_codes()
    chosen = sample(codes, per_module, seed)
    status = run_mutmut([name for names in chosen.values() for name in names])
    if status != 0:
        print(f"error: mutmut run ended with status {status}", file=sys.stderr)
        return status
    writer = RunWriter(results_dir / "records", new_run_id(), run_header({"mutation": "mutmut", "seed": seed,
                                                                         "per_module": per_module}))
    for record in mutation_records(exit_codes(), chosen, {m: len(n) for m, n in codes.items()},
                                   time.perf_counter() - started, per_module, seed):
        writer.append(record)
    writer.close()
    return 0
