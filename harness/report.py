"""Published tables: results/README.md (the headline and the seed's claims) and results/<suite>.md (with plots),
regenerated from the records by one command, `python -m harness report`.

Every suite page opens with a summary of its exactness checks (passed/failed/skipped and the worst figure against
the oracle per backend and strategy), keeps the per-test matrices in collapsed <details> blocks, and adds the
suite's own tables, registered in harness/tables/ with `@table("suite")`. Numbers are printed for a reader
(25.2 MB, 1.7x, 3.2e-6); an empty cell says n/a and the table says why; every table names the command that
reproduces it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd

from .records import Record, load_all, write_atomic

# --- number formats ----------------------------------------------------------------------------------------


def _significant(x: float, digits: int = 3) -> str:
    """`digits` significant figures without exponent for 1e-3 <= |x| < 1e6 (thousands separated), else 3.2e-6."""
    if x == 0 or not math.isfinite(x):
        return format_error(x)
    if not 1e-3 <= abs(x) < 1e6:
        return format_error(x)
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(x))))
    text = f"{round(x, decimals):,.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text  # 1.7, not 1.70


def format_error(x: float) -> str:
    """Errors: two significant figures, below 1e-3 with a short exponent (3.2e-6); 0 for an exact match."""
    if x == 0 or not math.isfinite(x):
        return {0: "0", math.inf: "inf", -math.inf: "-inf"}[x]
    if 1e-3 <= abs(x) < 1e6:
        return _significant(x, 2)
    mantissa, exponent = f"{x:.1e}".split("e")
    return f"{mantissa.removesuffix('.0')}e{int(exponent)}"


def format_bytes(n: float) -> str:
    """Decimal units, as model sizes are quoted: 25.2 MB, 4.82 MB, 512 B."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{_significant(n / size)} {unit}"
    return f"{n:.0f} B"


def format_ratio(x: float) -> str:
    return f"{_significant(x)}x"


def format_percent(fraction: float) -> str:
    return f"{_significant(100 * fraction)}%"


def format_number(x: object) -> str:
    """The default for a cell: integers exactly (thousands separated), other numbers to 3 significant figures."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    if float(x).is_integer() and abs(x) < 1e15:
        return f"{int(x):,}"
    return _significant(float(x))


FORMATS: dict[str, Callable[[float], str]] = {
    "bytes": format_bytes, "ratio": format_ratio, "error": format_error, "percent": format_percent,
    "number": format_number, "pvalue": lambda p: _significant(p, 2),
}
MISSING = "n/a"


def is_missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA


# --- tables ------------------------------------------------------------------------------------------------


@dataclass
class Table:
    title: str
    frame: pd.DataFrame
    notes: list[str] = field(default_factory=list)  # printed under the table: units, fits, caveats
    plot: str | None = None  # file name of a plot written beside the Markdown, shown under the table
    formats: dict[str, str] = field(default_factory=dict)  # column -> a key of FORMATS; others: format_number
    missing: str = "the records hold no such figure"  # why a cell is n/a; printed when a cell is
    reproduce: str | None = None  # the one command that remakes the table; the report fills in the suite's
    collapsed: bool = False  # shown in a <details> block: the detail under a summary

    def cells(self) -> pd.DataFrame:
        """Every cell as text: formatted numbers, n/a for a missing value, '|' escaped."""
        def cell(column: str, value: object) -> str:
            if is_missing(value):
                return MISSING
            if isinstance(value, str):
                return value.replace("|", "\\|")
            return FORMATS[self.formats.get(column, "number")](value)

        return pd.DataFrame({c: [cell(c, v) for v in self.frame[c]] for c in self.frame.columns}, dtype=object)

    def markdown(self) -> str:
        cells = self.cells()
        numeric = [pd.api.types.is_numeric_dtype(self.frame[c]) and not pd.api.types.is_bool_dtype(self.frame[c])
                   for c in self.frame.columns]
        body = cells.to_markdown(index=False, disable_numparse=True,
                                 colalign=["right" if n else "left" for n in numeric]) if len(cells) else "(no records)"
        notes = list(self.notes)
        if self.frame.map(is_missing).any().any():
            notes.append(f"{MISSING}: {self.missing}.")
        if self.reproduce:
            notes.append(f"Reproduce: `{self.reproduce}`")
        parts = [body, ""] + [f"{note}\n" for note in notes]
        if self.plot:
            parts += [f"![{self.title}]({self.plot})", ""]
        text = "\n".join(parts)
        if self.collapsed:
            return f"<details><summary>{self.title}</summary>\n\n{text}\n</details>\n"
        return f"## {self.title}\n\n{text}"


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


BASE_COLUMNS = ["suite", "tier", "test", "function", "backend", "model", "outcome", "reason", "machine", "commit",
                "time"]


def drop_empty(frame: pd.DataFrame) -> pd.DataFrame:
    """Without the strategy, parameter and metric columns no record of `frame` fills (other suites' columns)."""
    empty = [c for c in frame.columns if c not in BASE_COLUMNS and frame[c].isna().all()]
    return frame.drop(columns=empty)


def reproduce_command(suite: str, tier: str, backends) -> str:
    """The one command that re-runs a suite's tier on these backends and regenerates the tables."""
    marker = f'"{tier}"' if " " in tier else tier
    backend_args = "".join(f" --backend {b}" for b in sorted(b for b in set(backends) if isinstance(b, str)))
    return (f"python -m pytest suites/test_{suite}.py -m {marker}{backend_args} --results-dir results "
            "&& python -m harness report")


def latest(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """The latest record for each combination of `keys`: where two runs measured the same thing under settings the
    keys leave out (a kernel timed under two session models, with other thread counts), the newer run is shown."""
    return frame.sort_values("time", kind="stable").drop_duplicates(keys, keep="last")


def per_machine(rows: pd.DataFrame, keys: list[str], values: list[str]) -> pd.DataFrame:
    """One row per `keys`: a column per machine for a value where the machines' figures differ, one column where
    they agree (or when the records come from one machine)."""
    machines = sorted(rows["machine"].dropna().unique())
    if len(machines) <= 1:
        return rows[keys + values].reset_index(drop=True)
    indexed = rows.set_index(keys + ["machine"])
    out = rows[keys].drop_duplicates().set_index(keys)
    for value in values:
        wide = indexed[value].unstack("machine").reindex(out.index)
        agree = wide.apply(lambda row: len({str(v) for v in row if not is_missing(v)}) <= 1, axis=1).all()
        if agree:
            out[value] = wide.bfill(axis=1).iloc[:, 0]
        else:
            for machine in machines:
                out[f"{value} ({machine})"] = wide.get(machine)
    return out.reset_index()


def collapse(rows: pd.DataFrame, labels: list[str], name: str) -> pd.DataFrame:
    """Rows that agree on every other column become one, their `labels` joined into the column `name`
    ("onnxrt native, torch sdpa"): a figure repeated for each backend is printed once."""
    others = [c for c in rows.columns if c not in labels]
    text = rows[labels].astype(str).agg(" ".join, axis=1)
    keyed = rows[others].astype(str)
    merged = (pd.concat([rows[others], text.rename(name)], axis=1)
              .groupby([keyed[c] for c in others], sort=False)
              .agg({**{c: "first" for c in others}, name: ", ".join}).reset_index(drop=True))
    return merged[[name] + others]


# --- exactness: the summary and the per-test matrices ---------------------------------------------------------

OUTCOME_MARKS = {"passed": "pass", "failed": "FAIL", "skipped": "n/a", "xfailed": "xfail", "xpassed": "XPASS"}
# a kernel test's dtype is its precision strategy
STRATEGY_KEYS = ["quant", "param.dtype", "attention", "execution"]
# errors of the oracle's own yardstick (the plain low-precision path), not of the path under test
YARDSTICK_ERRORS = {"metric.plain_error", "metric.recompute_error"}


def distinct_checks(checks: pd.DataFrame) -> pd.DataFrame:
    """Exactness records with one record per check: the same test id run again (under another --model it does not
    use, as the kernel tests do) with the same outcome and figures is the same check, counted once."""
    same = ["machine", "test", "outcome"] + [c for c in checks if c.startswith("metric.")]
    return checks.sort_values("time", kind="stable").drop_duplicates(same, keep="last").sort_index()


def ratio_metrics(frame: pd.DataFrame) -> list[str]:
    """Error ratios against an oracle: metrics named `ratio` or `*_ratio` (not speed ratios, kept elsewhere)."""
    return [c for c in frame if c == "metric.ratio" or (c.startswith("metric.") and c.endswith("_ratio"))]


def error_metrics(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame if c.startswith("metric.") and c.endswith("_error") and c not in YARDSTICK_ERRORS]


def ratio_limit(metric: str) -> float:
    """The limit an error ratio is judged against (harness/oracles.py): the low-precision oracle's factor for
    `oracle_ratio`, 2 for every other."""
    from .oracles import PRECISION_FACTOR

    return PRECISION_FACTOR if metric == "metric.oracle_ratio" else 2.0


def worst_against_limit(judged: pd.DataFrame) -> tuple[float, float]:
    """The error ratio closest to (or furthest past) its limit, and that limit; NaN where none is recorded."""
    worst = (math.nan, math.nan)
    for metric in ratio_metrics(judged):
        values = judged[metric][judged[metric].map(lambda v: isinstance(v, float) and math.isfinite(v))]
        if len(values) and (math.isnan(worst[0]) or values.max() / ratio_limit(metric) > worst[0] / worst[1]):
            worst = (float(values.max()), ratio_limit(metric))
    return worst


def exactness_figures(checks: pd.DataFrame) -> dict[str, object]:
    """Counts by outcome, the worst error ratio, the largest error and the smallest p-value of a set of checks
    (documented deviations, xfail, are counted but left out of the worst figures); NaN where none is recorded."""
    counts = checks["outcome"].value_counts()
    judged = checks[checks["outcome"] != "xfailed"]

    def worst(columns: list[str], how: str) -> float:
        values = judged[columns].stack() if columns else pd.Series(dtype=float)
        values = values[values.map(math.isfinite)]  # a ratio over an exact plain path (0) is judged by a bound
        return float(getattr(values, how)()) if len(values) else math.nan

    reasons = checks.loc[checks["outcome"] == "skipped", "reason"].dropna() if "reason" in checks else pd.Series()
    worst_ratio, ratio_limit = worst_against_limit(judged)
    return {
        "checks": len(checks), "passed": int(counts.get("passed", 0)), "failed": int(counts.get("failed", 0)),
        "skipped": int(counts.get("skipped", 0)),
        "xfailed": int(counts.get("xfailed", 0)), "xpassed": int(counts.get("xpassed", 0)),
        "worst_ratio": worst_ratio, "ratio_limit": ratio_limit, "max_error": worst(error_metrics(judged), "max"),
        "min_pvalue": worst([c for c in ("metric.min_pvalue",) if c in judged], "min"),
        "skip_reasons": "; ".join(sorted(reasons.unique())),
        "main_skip_reason": reasons.mode().iloc[0] if len(reasons) else "",  # the reason most skips give
    }


def strategy_label(frame: pd.DataFrame) -> pd.Series:
    """'fp32, sdpa': the strategies a record ran under; '(none)' for a test of tensors alone."""
    present = [c for c in STRATEGY_KEYS if c in frame]
    if not present:
        return pd.Series("(none)", index=frame.index)
    return frame[present].apply(lambda row: ", ".join(str(v) for v in row if not is_missing(v)) or "(none)", axis=1)


def exactness_summary(checks: pd.DataFrame, suite: str) -> Table:
    """One row per backend and strategy: passed/failed/skipped and the worst figures against the oracle."""
    reproduce = reproduce_command(suite, "exactness", checks["backend"])
    checks = checks.assign(backend=checks["backend"].fillna("(none: tensors)"), strategy=strategy_label(checks))
    rows = []
    for (machine, backend, strategy), group in checks.groupby(["machine", "backend", "strategy"], sort=True):
        figures = exactness_figures(group)
        rows.append({"machine": machine, "backend": backend, "strategy": strategy,
                     "checks": figures["checks"], "passed": figures["passed"], "failed": figures["failed"],
                     "skipped (n/a)": figures["skipped"], "xfail (documented)": figures["xfailed"],
                     "worst error ratio": figures["worst_ratio"], "its limit": figures["ratio_limit"],
                     "max abs error": figures["max_error"], "smallest p-value (limit 1e-4)": figures["min_pvalue"],
                     "why skipped": figures["skip_reasons"] or "-"})
    frame = pd.DataFrame(rows)
    keys = ["backend", "strategy"]
    values = [c for c in frame.columns if c not in keys + ["machine"]]
    values = [c for c in values if not (frame[c].isna().all() or (frame[c].astype(str) == "0").all()
                                        and c in ("failed", "xfail (documented)"))]
    frame = per_machine(frame, keys, values)
    notes = ["checks: the suite's exactness tests on this backend and strategy, every model and parameter. "
             "error ratio: the error of the path under test over the plain path's error against the same "
             "high-precision oracle (the suites' rule: at most 2). max abs error: the largest difference from the "
             "oracle the tests recorded (logits or attention outputs). xfail: documented deviations, left out of "
             "the worst figures."]
    return Table("Exactness outcomes: summary by backend and strategy", frame, notes,
                 formats={"worst error ratio": "ratio", "its limit": "ratio", "max abs error": "error",
                          "smallest p-value (limit 1e-4)": "pvalue"},
                 missing="none of the row's checks ran (see why skipped), or they record no such figure (they assert "
                         "equality or a bound)",
                 reproduce=reproduce)


def _determined(group: pd.DataFrame, column: str, by: list[str]) -> bool:
    """Whether `column` has one value for each combination of `by` (so it adds nothing as a row key)."""
    return bool(by) and bool((group.groupby(by, dropna=False)[column].nunique(dropna=False) <= 1).all())


def _sort_key(value: object) -> tuple:
    """Numbers before text, numbers by value (17 before 1025), missing last."""
    if is_missing(value):
        return (2, 0, "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value, "")
    return (1, 0, str(value))


MAX_COLUMNS = 8  # a parameter with more values than this stays in the rows


def _spread_parameter(group: pd.DataFrame, keys: list[str]) -> str | None:
    """The parameter to spread across columns (k, N, the position encoding...): one whose every value occurs with
    every other combination (no holes), the one with the most values up to MAX_COLUMNS; None when each would leave
    holes (parameters varied in pairs) or make the table too wide."""
    complete = []
    for column in (k for k in keys if k.startswith("param.")):
        others = [k for k in keys if k != column]
        combinations = len(group[others].drop_duplicates()) if others else 1
        values = group[column].nunique()
        if combinations * values == len(group.drop_duplicates(keys)) and values <= MAX_COLUMNS:
            complete.append(column)
    return max(complete, key=lambda column: group[column].nunique(), default=None)


def outcome_details(checks: pd.DataFrame, suite: str) -> list[Table]:
    """Per-test outcome matrices, collapsed: tests sharing a parameter set share a table (a column per test);
    a test alone in its set spreads its most varied parameter (k, N, position...) across the columns."""
    checks = checks.copy()
    checks["mark"] = checks["outcome"].map(OUTCOME_MARKS).fillna(checks["outcome"])
    candidates = list(dict.fromkeys(["backend", "model"] + [c for c in STRATEGY_KEYS if c in checks] + sorted(
        c for c in checks if c.startswith("param."))))
    present = checks[candidates].notna().groupby(checks["function"]).any()  # a test's keys, in any of its records
    checks["signature"] = checks["function"].map(
        {function: tuple(c for c in candidates if row[c]) for function, row in present.iterrows()})
    tables = []
    for signature, group in checks.groupby("signature", sort=True):
        group = group.copy()
        keys = [c for c in signature if group[c].nunique() > 1]
        constant = [f"{c.removeprefix('param.')} {group[c].iloc[0]}" for c in signature
                    if group[c].nunique(dropna=False) == 1 and not is_missing(group[c].iloc[0])]
        if "model" in keys and _determined(group, "model", [k for k in keys if k != "model"]):
            keys.remove("model")  # each small model is named by its position and kind, already columns
        functions = sorted(group["function"].unique())
        spread = _spread_parameter(group, keys) if len(functions) == 1 else None
        group = group.sort_values(keys, key=lambda column: column.map(_sort_key))
        if spread:
            label = spread.removeprefix("param.")
            group["column"] = group[spread].map(lambda v: f"{label}={format_number(v)}")
            keys.remove(spread)
            order = list(dict.fromkeys(group.sort_values(spread)["column"]))
        else:
            group["column"] = group["function"]
            order = functions
        group[keys] = group[keys].astype(object).map(lambda v: "-" if is_missing(v) else format_number(v))
        if keys:
            matrix = group.pivot_table(index=keys, columns="column", values="mark", aggfunc="first", fill_value="—",
                                       sort=False)
            matrix = matrix[order].reset_index()
        else:
            matrix = group.pivot_table(columns="column", values="mark", aggfunc="first")[order].reset_index(drop=True)
        matrix = matrix.rename(columns=lambda c: c.removeprefix("param."))
        matrix.columns.name = None
        skipped = sorted(group.loc[group["outcome"] == "skipped", "reason"].dropna().unique()) \
            if "reason" in group else []
        notes = ["All on " + ", ".join(constant) + "." if constant else "",
                 "n/a: skipped, " + "; ".join(skipped) + "." if skipped else "",
                 "—: no such test (not parametrized)." if (matrix == "—").any().any() else ""]
        title = f"{', '.join(functions)}: {len(group)} checks"
        tables.append(Table(title, matrix, [n for n in notes if n], collapsed=True,
                            reproduce=reproduce_command(suite, "exactness", group["backend"])))
    return tables


# --- pages -------------------------------------------------------------------------------------------------


def suite_tables(suite: str, frame: pd.DataFrame, results_dir: Path) -> list[Table]:
    from . import tables  # noqa: F401  (imports register the suite-specific table functions)

    out = []
    checks = distinct_checks(frame[frame["tier"] == "exactness"])
    if len(checks):
        out.append(exactness_summary(drop_empty(checks), suite))
        out.extend(outcome_details(drop_empty(checks), suite))
    frame = pd.concat([checks, frame[frame["tier"] != "exactness"]])  # each check once for the suite's tables too
    tiers = " or ".join(sorted(frame["tier"].unique()))
    for fn in _TABLES.get(suite, []):
        for made in fn(frame, results_dir):
            made.reproduce = made.reproduce or reproduce_command(suite, tiers, frame["backend"])
            out.append(made)
    return out


def provenance(frame: pd.DataFrame) -> str:
    machines = ", ".join(sorted(frame["machine"].dropna().unique())) or "unknown"
    commits = ", ".join(sorted(frame["commit"].dropna().unique())) or "unknown"
    return f"machine: {machines}; commit: {commits}"


def write_report(results_dir: Path) -> list[Path]:
    """Regenerate results/README.md and results/<suite>.md from the records under results/records/; returns the
    files written (none when there are no records)."""
    return write_pages(results_dir, load_all(results_dir / "records"))


def write_pages(results_dir: Path, records: list[Record]) -> list[Path]:
    from .tables.headline import readme

    if not records:
        return []
    frame = records_frame(records)
    written = []
    for suite, suite_frame in frame.groupby("suite", sort=True):
        tables = suite_tables(suite, drop_empty(suite_frame), results_dir)
        header = (f"# {suite}\n\nGenerated from the records (results/records/) by `python -m harness report` "
                  f"({provenance(suite_frame)}). Back to the [headline](README.md).\n\n")
        path = results_dir / f"{suite}.md"
        write_atomic(path, header + "\n".join(t.markdown() for t in tables))
        written.append(path)
    path = results_dir / "README.md"
    write_atomic(path, readme(frame, {p.stem for p in written}))
    written.append(path)
    return written
