"""Faults of the harness itself: an oracle, the records, the report and the gate, each patched with one plausible
bug; the harness's own tests (tests/test_*.py) are the suites meant for them."""
from __future__ import annotations

import math

import pandas as pd
import scipy.stats

import harness.gate
import harness.oracles
import harness.records
import harness.report

from . import Fault


def pvalue_with_one_dof_too_many(monkeypatch):
    """The chi-square p-value is taken on the number of categories as degrees of freedom (not one fewer), so a
    biased sampler passes more often."""
    faithful = harness.oracles.chi_square_pvalue

    def chi_square_pvalue(counts, probs, min_expected=5.0):
        statistic, _, dof = faithful(counts, probs, min_expected)
        if dof < 1:
            return statistic, 1.0, dof
        return statistic, float(scipy.stats.chi2.sf(statistic, dof + 1)), dof + 1

    monkeypatch.setattr(harness.oracles, "chi_square_pvalue", chi_square_pvalue)


def record_drops_non_finite_metrics(monkeypatch):
    """A record's non-finite figures (an infinite error ratio, a NaN) are dropped rather than written as the
    strings "inf" and "nan": the metric disappears from the record."""
    faithful = harness.records._strict

    def strict(value):
        if isinstance(value, dict):
            return {k: strict(v) for k, v in value.items() if not (isinstance(v, float) and not math.isfinite(v))}
        return faithful(value)

    monkeypatch.setattr(harness.records, "_strict", strict)


def strategy_label_of_the_first_row(monkeypatch):
    """The exactness summary labels every row with the first record's strategy (a scalar broadcast where a
    per-row label is meant): two strategies' checks are counted under one name."""
    faithful = harness.report.strategy_label

    def strategy_label(frame):
        labels = faithful(frame)
        return pd.Series(labels.iloc[0] if len(labels) else "(none)", index=frame.index)

    monkeypatch.setattr(harness.report, "strategy_label", strategy_label)


def gate_direction_ignored(monkeypatch):
    """The gate measures every change as if higher were better: a rise in perplexity (lower is better) passes as an
    improvement."""
    monkeypatch.setattr(harness.gate, "_relative_change",
                        lambda new, old, rule: new - old if rule.absolute else (new - old) / abs(old) if old else 0.0)


FAULTS = [
    Fault("pvalue-dof-off-by-one", "harness", pvalue_with_one_dof_too_many.__doc__, "tests/test_statistics.py",
          "chi_square or assert_distribution", "FAILED *test_statistics.py::test_assert_distribution*",
          patch=pvalue_with_one_dof_too_many),
    Fault("record-drops-non-finite-metric", "harness", record_drops_non_finite_metrics.__doc__,
          "tests/test_records.py", "non_finite", "FAILED *test_records.py::test_non_finite_figures* - KeyError*",
          patch=record_drops_non_finite_metrics, outcomes={"failed": 1}),
    Fault("report-mislabels-strategy", "harness", strategy_label_of_the_first_row.__doc__, "tests/test_report.py",
          "exactness_summary or own_summary_row",
          "FAILED *test_report.py::test_each_strategy_gets_its_own_summary_row*",
          patch=strategy_label_of_the_first_row),
    Fault("gate-ignores-direction", "harness", gate_direction_ignored.__doc__, "tests/test_gate.py",
          "quality_is_hard", "FAILED *test_gate.py::test_quality_is_hard_within_its_tolerance_in_its_direction*",
          patch=gate_direction_ignored, outcomes={"failed": 1}),
]
