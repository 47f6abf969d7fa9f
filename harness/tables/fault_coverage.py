"""results/fault_coverage.md: the planted faults (tests/faults/) against the suites meant to catch them, and the
mutation score of backends/ and harness/oracles.py (harness/mutation.py); both from the records of
`python -m harness faults`."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from harness.report import Table, format_percent, latest, table

SUITE = "fault_coverage"
REPRODUCE = "python -m harness faults"
FAULT_TEST = "test_the_suite_meant_for_the_fault_catches_it"
REFERENCE_TEST = "test_the_reference_passes_the_same_selections"
GOAL = 0.95  # of the planted faults, caught by the suite meant for them


def fault_rows(frame: pd.DataFrame) -> pd.DataFrame:
    rows = frame[(frame["tier"] == "faults") & (frame["function"] == FAULT_TEST)]
    return latest(rows, ["param.fault"]).sort_values(["param.area", "param.fault"]) if len(rows) else rows


def verdict(row: pd.Series) -> str:
    """caught, escapes (a known gap, named in the registry) or MISSED; a fault caught without the expected message
    or outcome counts says so."""
    if row["outcome"] == "xfailed":
        return "escapes"
    if row["metric.caught"] != 1:
        return "MISSED"
    return "caught" if row["outcome"] == "passed" else "caught, but not as expected"


@table(SUITE)
def fault_tables(frame: pd.DataFrame, results_dir: Path) -> list[Table]:
    faults = fault_rows(frame)
    if not len(faults):
        return []
    faults = faults.assign(verdict=faults.apply(verdict, axis=1))
    caught = faults["verdict"].str.startswith("caught")
    by_area = (faults.assign(caught=caught, escapes=faults["verdict"] == "escapes")
               .groupby("param.area").agg(faults=("param.fault", "size"), caught=("caught", "sum"),
                                          escapes=("escapes", "sum"),
                                          suite=("param.suite_meant", lambda s: ", ".join(sorted(set(s))))))
    by_area["caught (%)"] = by_area["caught"] / by_area["faults"]
    summary = by_area.reset_index().rename(columns={"param.area": "area", "suite": "suite meant"})
    share = caught.mean()
    notes = [f"Caught by the suite meant for them: {int(caught.sum())} of {len(faults)} planted faults "
             f"({format_percent(share)}; goal {format_percent(GOAL)}). A fault is caught when, planted alone, the "
             "suite's selection for it fails with a line matching the fault's message (which names the area) and "
             "the outcome counts the registry expects. escapes: a known gap, kept in the registry with its reason."]
    detail = pd.DataFrame({
        "fault": faults["param.fault"], "area": faults["param.area"],
        "the bug": faults["param.what"].str.split().str.join(" "),  # a docstring: one line in a table cell
        "suite meant": faults["param.suite_meant"], "selection (-k)": faults["param.selection"],
        "verdict": faults["verdict"], "failed tests": faults["metric.failed"],
        "caught by": faults["param.caught_by"].replace("", "-"),
        "message matched": faults["param.matched"].replace("", "-"), "time (s)": faults["metric.run_s"],
    }).reset_index(drop=True)
    escapes = faults.loc[faults["verdict"] == "escapes", ["param.fault", "param.escapes"]]
    detail_notes = ["time: the inner run of the selection on this machine, planted fault included."]
    detail_notes += [f"{name} escapes: {why}" for name, why in escapes.itertuples(index=False)]
    tables = [Table("Planted faults caught, by area", summary, notes, formats={"caught (%)": "percent"},
                    reproduce=REPRODUCE),
              Table("Each planted fault: the suite meant for it, caught by which tests", detail, detail_notes,
                    reproduce=REPRODUCE)]
    references = frame[(frame["tier"] == "faults") & (frame["function"] == REFERENCE_TEST)]
    if len(references):
        references = latest(references, ["test"])
        tables.append(Table("The reference passes the same selections", pd.DataFrame({
            "suite": references["param.suite"], "reference backend": references["param.reference"],
            "options": references["param.args"], "outcome": references["outcome"]}).reset_index(drop=True),
            ["Each faulty run's selection, run on the backend the fault was planted in, fault-free: every one must "
             "pass, so a caught fault is the fault's doing."], reproduce=REPRODUCE, collapsed=True))
    return tables


@table(SUITE)
def mutation_tables(frame: pd.DataFrame, results_dir: Path) -> list[Table]:
    runs = frame[frame["tier"] == "mutation"]
    if not len(runs):
        return []
    runs = latest(runs, ["param.module"]).sort_values("param.module")
    judged = runs["metric.mutants"] - runs["metric.no_tests"]
    scores = pd.DataFrame({
        "module": runs["param.module"], "mutants": runs["metric.mutants"], "killed": runs["metric.killed"],
        "survived": runs["metric.survived"], "timeout": runs["metric.timeout"], "no tests": runs["metric.no_tests"],
        "score": runs["metric.killed"] / judged.where(judged > 0)}).reset_index(drop=True)
    killed, total = runs["metric.killed"].sum(), judged.sum()
    notes = [f"Mutation score: {int(killed)} killed of {int(total)} mutants tested ({format_percent(killed / total)}); "
             "a mutant is killed when a test of the selection that runs its function fails (a timeout counts as "
             "survived; `no tests`: no test of the selection runs the function, left out of the score).",
             f"Tool and selection: {runs['param.tool'].iloc[0]}; {runs['param.tests'].iloc[0]}",
             f"Mutants: {runs['param.sample'].iloc[0]}"]
    survived = [(module, name) for module, names in zip(runs["param.module"], runs["param.survived"])
                for name in str(names).split() if name]
    tables = [Table("Mutation score", scores, notes, formats={"score": "percent"}, reproduce=REPRODUCE)]
    if survived:
        survivors = pd.DataFrame(survived, columns=["module", "mutant"])
        tables.append(Table(f"Surviving mutants ({len(survived)})", survivors,
                            ["`mutmut show NAME` (after the run, in the repository root) prints a mutant's diff."],
                            reproduce=REPRODUCE, collapsed=True))
    return tables
