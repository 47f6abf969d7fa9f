"""python -m harness COMMAND: run (the main job), faults, report, gate, kv-calc, train."""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from .mutation import PER_MODULE
from .records import RecordsError

MAIN_JOB_MARKERS = "exactness or bench"
# a first look in a few minutes: the exactness checks of the --model checkpoint, without the configuration matrix
QUICK_MARKERS = "exactness and not config_matrix"
PUBLISHED = Path("results")
# pytest's exit statuses after which the records hold results worth tabulating: all passed, some failed
TABULATED_STATUSES = (0, 1)


def run_main_job(results_dir: Path, pytest_args: list[str], quick: bool = False) -> int:
    """The suites on the default model (every available backend), published into `results_dir`, then the tables."""
    from backends.registry import available

    backend_args = [arg for name in available() for arg in ("--backend", name)]
    # a child process: pytest must import the plugin's modules itself (assertion rewriting, warnings as errors)
    markers = QUICK_MARKERS if quick else MAIN_JOB_MARKERS
    status = subprocess.run([sys.executable, "-m", "pytest", "suites", "-m", markers,
                             "--results-dir", str(results_dir), *backend_args, *pytest_args]).returncode
    if status not in TABULATED_STATUSES:
        print(f"error: pytest ended with status {status}; tables not regenerated", file=sys.stderr)
        return status
    return report(results_dir) or status


def run_faults(results_dir: Path, per_module: int, pytest_args: list[str]) -> int:
    """The fault tier (every planted fault against the suite meant for it), then the mutation run, recorded into
    `results_dir`, then the tables (results/fault_coverage.md among them)."""
    from .mutation import run_mutation

    status = subprocess.run([sys.executable, "-m", "pytest", "tests/test_fault_coverage.py", "-m", "faults",
                             "--results-dir", str(results_dir), *pytest_args]).returncode
    if status not in TABULATED_STATUSES:
        print(f"error: pytest ended with status {status}; tables not regenerated", file=sys.stderr)
        return status
    return run_mutation(results_dir, per_module) or report(results_dir) or status


def report(results_dir: Path) -> int:
    from .report import write_report

    try:
        paths = write_report(results_dir)
    except RecordsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not paths:
        print(f"error: no records under {results_dir / 'records'}; run the suites first", file=sys.stderr)
        return 2
    for path in paths:
        print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .gate import add_gate_arguments, main_gate

    parser = argparse.ArgumentParser(prog="python -m harness", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the suites (exactness and bench tiers) and publish the tables")
    run.add_argument("--results-dir", type=Path, default=PUBLISHED, help=f"default: {PUBLISHED}")
    run.add_argument("--quick", action="store_true",
                     help=f"a first look: only -m '{QUICK_MARKERS}' (a few minutes), then the tables")
    run.add_argument("pytest_args", nargs=argparse.REMAINDER, help="extra arguments passed to pytest")
    faults = commands.add_parser("faults", help="run the planted faults and the mutation run, then the tables "
                                                "(results/fault_coverage.md)")
    faults.add_argument("--results-dir", type=Path, default=PUBLISHED, help=f"default: {PUBLISHED}")
    faults.add_argument("--mutants-per-module", type=int, default=PER_MODULE,
                        help=f"mutants sampled from each mutated module (default: {PER_MODULE})")
    faults.add_argument("pytest_args", nargs=argparse.REMAINDER, help="extra arguments passed to pytest")
    rep = commands.add_parser("report", help="regenerate results/*.md from the run files in results/records/")
    rep.add_argument("--results-dir", type=Path, default=PUBLISHED, help=f"default: {PUBLISHED}")
    gate = commands.add_parser("gate", help="judge a run against a baseline (exit 0 pass, 1 regression, 2 error)")
    add_gate_arguments(gate)
    commands.add_parser("kv-calc", help="KV-cache and weight bytes of a named model or a config.json", add_help=False)
    commands.add_parser("train", help="train the embedded default models", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "kv-calc":
        from .kv_calc import main_kv_calc

        return main_kv_calc(rest)
    if args.command == "train":
        from .training import main_train

        return main_train(rest)
    if args.command == "run":
        return run_main_job(args.results_dir, args.pytest_args + rest, args.quick)
    if args.command == "faults":
        if args.mutants_per_module < 1:
            parser.error(f"--mutants-per-module {args.mutants_per_module}: expected a positive number of mutants")
        return run_faults(args.results_dir, args.mutants_per_module, args.pytest_args + rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "gate":
        return main_gate(args)
    return report(args.results_dir)


if __name__ == "__main__":
    sys.exit(main())
