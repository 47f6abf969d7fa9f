"""Published tables: results/<suite>.md (and plots) regenerated from the records by one command.

Every suite gets an outcome matrix of its exactness tests (one row per backend, strategy and parameters;
one column per test; skipped capabilities show as n/a). A suite with measurements adds its own tables by
registering a function in harness/tables/ with `@table("suite")`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd

from .records import Record, load_all, write_atomic


@dataclass
class Table:
    title: str
    frame: pd.DataFrame
    notes: list[str] = field(default_factory=list)  # printed under the table: units, fits, caveats
    plot: str | None = None  # file name of a plot written beside the Markdown, shown under the table

    def markdown(self) -> str:
        parts = [f"## {self.title}", "", self.frame.to_markdown(index=False, floatfmt=".4g") if len(self.frame) else "(no records)"]
        parts += [""] + [f"{note}" for note in self.notes] if self.notes else []
        if self.plot:
            parts += ["", f"![{self.title}]({self.plot})"]
        return "\n".join(parts) + "\n"


TableFn = Callable[[pd.DataFrame, Path], list[Table]]
_TABLES: dict[str, list[TableFn]] = {}


def table(suite: str) -> Callable[[TableFn], TableFn]:
    """Register fn(frame, results_dir) -> [Table] for a suite's records (fn may write plots into results_dir)."""

    def decorate(fn: TableFn) -> TableFn:
        _TABLES.setdefault(suite, []).append(fn)
        return fn

    return decorate


def records_frame(records: list[Record]) -> pd.DataFrame:
    """One row per record; strategy and params become columns (their own names), metrics prefixed 'metric.'."""
    rows = []
    for r in records:
        row = {"suite": r.suite, "tier": r.tier, "test": r.test, "function": r.test.split("::")[-1].split("[")[0],
               "backend": r.backend, "model": r.model, "outcome": r.outcome, "reason": r.reason,
               "machine": r.machine.get("id"), "commit": r.commit, "time": r.time}
        row.update(r.strategy)
        row.update({f"param.{k}": v for k, v in r.params.items()})
        row.update({f"metric.{k}": v for k, v in r.metrics.items()})
        rows.append(row)
    return pd.DataFrame(rows)


OUTCOME_MARKS = {"passed": "pass", "failed": "FAIL", "skipped": "n/a", "xfailed": "xfail", "xpassed": "XPASS"}


def outcome_matrices(frame: pd.DataFrame) -> list[Table]:
    """Exactness outcomes, one table per set of parameters: a row per backend/strategy/parameters, a column per
    test function, so tests parametrized alike share a table."""
    frame = frame.copy()
    frame["mark"] = frame["outcome"].map(OUTCOME_MARKS).fillna(frame["outcome"])
    param_columns = [c for c in frame if c.startswith("param.")]
    frame["signature"] = frame[param_columns].notna().apply(
        lambda row: tuple(c for c, present in row.items() if present), axis=1) if param_columns else [()] * len(frame)
    tables = []
    for signature, group in frame.groupby("signature", sort=True):
        key_columns = [c for c in ["backend", "model", "quant", "attention"] if c in group and group[c].notna().any()]
        key_columns += sorted(signature)
        group = group.copy()
        group[key_columns] = group[key_columns].astype(object).fillna("")
        matrix = group.pivot_table(index=key_columns, columns="function", values="mark", aggfunc="first", fill_value="")
        matrix = matrix.reset_index().rename(columns=lambda c: c.removeprefix("param."))
        matrix.columns.name = None
        by = ", ".join(c.removeprefix("param.") for c in signature) or "strategy"
        reasons = group.get("reason", pd.Series(index=group.index, dtype=object))  # absent when nothing skipped
        skipped = reasons[group["outcome"] == "skipped"].dropna().unique()
        tables.append(Table(f"Exactness outcomes by {by}", matrix, ["n/a: " + r for r in sorted(skipped)[:10]]))
    return tables


def suite_tables(suite: str, frame: pd.DataFrame, results_dir: Path) -> list[Table]:
    from . import tables  # noqa: F401  (imports register the suite-specific table functions)

    out = []
    checks = frame[frame["tier"] == "exactness"]
    if len(checks):
        out.extend(outcome_matrices(checks.dropna(axis=1, how="all")))
    for fn in _TABLES.get(suite, []):
        out.extend(fn(frame, results_dir))
    return out


def write_report(results_dir: Path) -> list[Path]:
    """Regenerate results/<suite>.md from results/records/*.json; returns the files written."""
    records = load_all(results_dir / "records")
    if not records:
        return []
    frame = records_frame(records)
    written = []
    for suite, suite_frame in frame.groupby("suite", sort=True):
        tables = suite_tables(suite, suite_frame.dropna(axis=1, how="all"), results_dir)
        machines = ", ".join(sorted(suite_frame["machine"].dropna().unique()))
        commits = ", ".join(sorted(suite_frame["commit"].dropna().unique()))
        header = (f"# {suite}\n\nGenerated by `python -m harness report` from results/records/{suite}.json "
                  f"(machine: {machines}; commit: {commits}).\n\n")
        path = results_dir / f"{suite}.md"
        write_atomic(path, header + "\n".join(t.markdown() for t in tables))
        written.append(path)
    return written
