"""The regression gate: a run (a set of run files) against a baseline, as a CI pass or fail.

- Exactness is hard: a test that passed (or failed as expected) in the baseline and does not now is a regression.
- Quality metrics are hard within a stated tolerance (absolute or relative, direction-aware).
- Speed is gated only on ratios measured inside one run (an optimization over its baseline strategy, a backend
  over another), never on absolute seconds across machines, and only when the change is outside the noise: with
  the repeats behind the ratio in both runs, a one-sided Mann-Whitney U test (scipy.stats.mannwhitneyu) must reject
  "no change" at `alpha` as well as the change exceeding the tolerance, as continuous-benchmarking services do.
- Every metric the suites emit has a rule (DEFAULT_RULES, or `info`: reported, never gated); the committed config
  `[tool.exactbench.gate]` in pyproject.toml (or a TOML file given with --config) overrides them.

Exit status: 0 pass, 1 regression, 2 usage or data error.
"""
from __future__ import annotations

import math
import shutil
import sys
import tomllib
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

from scipy.stats import mannwhitneyu

from .records import Record, RecordsError, dumps, load_records, run_files, run_header, write_atomic

PASSING = ("passed", "xfailed")


@dataclass(frozen=True)
class Rule:
    kind: str  # speed, quality or info
    better: str = "higher"  # higher or lower
    tolerance: float = 0.0  # the change allowed before it counts: relative (0.1 = 10%) or, if absolute, in units
    absolute: bool = False

    def __post_init__(self):
        if self.kind not in ("speed", "quality", "info") or self.better not in ("higher", "lower") or self.tolerance < 0:
            raise ValueError(f"bad gate rule {self}: kind is speed|quality|info, better is higher|lower, "
                             "tolerance >= 0")


INFO = Rule("info")
# Exactness-tier figures (errors, ratios to an oracle, p-values) are judged by their test's outcome; absolute
# seconds and bytes depend on the machine. Both are reported, never gated.
DEFAULT_RULES: dict[str, Rule] = {
    "ratio_to_torch_fp32": Rule("speed", "higher", 0.10),
    "speedup": Rule("speed", "higher", 0.10),
    "acceptance_rate": Rule("quality", "higher", 0.02, absolute=True),
    "tokens_per_target_call": Rule("quality", "higher", 0.05, absolute=True),
    "ppl": Rule("quality", "lower", 0.01),
    "same_top1": Rule("quality", "higher", 0.005, absolute=True),
    "ratio_to_fp32": Rule("speed", "higher", 0.10),  # a quantization strategy over its backend's fp32
    "ratio_to_genai": Rule("speed", "higher", 0.10),  # onnxrt over onnxruntime-genai, timed alternately
    "mean_kld": Rule("quality", "lower", 0.10),
    "delta_ppl": Rule("quality", "lower", 0.05, absolute=True),
    "shared_prefix_skipped_pct": Rule("quality", "higher", 1.0, absolute=True),
}
INFO_METRICS = {
    "baseline_tokens_per_s", "c", "predicted_speedup", "predicted_with_verify_cost", "verify_cost", "tokens_per_s",
    "target_tokens_per_s", "acceptance_median", "acceptance_min", "acceptance_max", "measured_over_predicted",
    "looping_outputs", "rounds", "ppl_err", "same_top1_err", "parameters", "scored_tokens", "heldout_tokens",
    "draws", "proposals_checked", "identical_rows", "first_mismatch", "element_bytes", "kv_bytes_per_token",
    "min_pvalue", "pvalue_plain", "pvalue_speculative", "ratio", "error_ratio", "optimized_error", "plain_error",
    "cached_error", "recompute_error", "max_abs_logit_error", "prefill_max_abs_error", "decode_max_abs_error",
    # quantization: figures beside the gated mean KLD and ΔPPL
    "base_ppl", "delta_ppl_err", "mean_kld_err", "kld_p99", "kld_max", "rms_delta_p", "rms_delta_p_err",
    "base_tokens_per_s", "layers", "max_error_in_steps", "bits_per_weight", "tries", "max_abs_logit",
    # serving: absolute rates and counts depend on the machine and the arrival timing
    "requests", "output_tokens", "request_throughput", "output_throughput", "output_throughput_uncached",
    "kv_waste_pct", "preemptions", "max_running", "steps", "mixed_steps", "prefix_tokens_skipped", "ttft_cut_pct",
    "ttft_mean_ms_uncached", "peak_blocks_held", "peak_blocks_held_unshared", "blocks_saved_pct", "copies_on_write",
    "output_throughput_unshared",
    # engines: the roofline fraction depends on the machine's measured bandwidth, read in the same run
    "roofline_fraction", "machine_read_GBps", "achieved_GBps", "weights_fit_in_cache", "same_token_rows",
    # serving under an SLO: depends on the machine's absolute speed
    "goodput", "slo_met_pct",
    # the fault registry (a fault no longer caught fails its test: the outcome is gated) and the mutation tally
    "caught", "failed", "passed", "mutants", "population", "killed", "survived", "timeout", "no_tests",
}
INFO_SUFFIXES = ("_s", "_ms", "_bytes", "_mb", "_error", "_ratio", "_pvalue", "_err")


def rule_for(name: str, rules: dict[str, Rule]) -> Rule | None:
    if name in rules:
        return rules[name]
    if name in INFO_METRICS or name.endswith(INFO_SUFFIXES):
        return INFO
    return None


@dataclass
class GateConfig:
    baseline: Path = Path("results/records")
    alpha: float = 0.01
    rules: dict[str, Rule] = field(default_factory=lambda: dict(DEFAULT_RULES))

    @classmethod
    def load(cls, path: Path | None) -> "GateConfig":
        """Defaults, overridden by `[tool.exactbench.gate]` of pyproject.toml (or the same table of `path`)."""
        source = path or Path("pyproject.toml")
        rules = dict(DEFAULT_RULES)
        if not source.is_file():
            if path is not None:
                raise ValueError(f"gate config {path}: no such file")
            return cls(rules=rules)
        try:
            table = tomllib.loads(source.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"gate config {source}: not TOML ({error})") from None
        section = table.get("tool", {}).get("exactbench", {}).get("gate", {})
        try:
            for name, fields in section.get("metrics", {}).items():
                rules[name] = Rule(**fields)
            config = cls(Path(section.get("baseline", cls.baseline)), float(section.get("alpha", cls.alpha)), rules)
        except (TypeError, ValueError) as error:
            raise ValueError(f"gate config {source} [tool.exactbench.gate]: {error}") from None
        if not 0 < config.alpha < 1:
            raise ValueError(f"gate config {source}: alpha {config.alpha} is not in (0, 1)")
        return config


@dataclass
class Finding:
    status: str  # regression, improvement, unchanged, missing, new, ungated
    test: str
    model: str | None
    what: str  # "outcome" or a metric name
    baseline: str
    run: str
    detail: str = ""


def _relative_change(new: float, old: float, rule: Rule) -> float:
    """Signed change in the better direction (positive: better), absolute or relative to the baseline."""
    change = new - old if rule.absolute else (new - old) / abs(old) if old else (0.0 if new == old else math.inf)
    return change if rule.better == "higher" else -change


def _noise_pvalues(new: list[float], old: list[float], rule: Rule) -> tuple[float, float]:
    """One-sided Mann-Whitney p-values for (run worse than baseline, run better than baseline)."""
    worse = "less" if rule.better == "higher" else "greater"
    better = "greater" if rule.better == "higher" else "less"
    return (float(mannwhitneyu(new, old, alternative=worse).pvalue),
            float(mannwhitneyu(new, old, alternative=better).pvalue))


def compare_metric(name: str, new: Record, old: Record, rule: Rule, alpha: float) -> Finding:
    value, reference = new.metrics[name], old.metrics[name]
    finding = Finding("unchanged", new.test, new.model, name, f"{reference:.4g}", f"{value:.4g}")
    if not (math.isfinite(value) and math.isfinite(reference)):
        if math.isfinite(reference) and not math.isfinite(value):
            finding.status, finding.detail = "regression", "became non-finite"
        return finding
    change = _relative_change(value, reference, rule)
    finding.detail = f"{change:+.3g}" if rule.absolute else f"{change:+.1%}"
    outside = abs(change) > rule.tolerance
    if rule.kind == "speed" and name in new.samples and name in old.samples and \
            len(new.samples[name]) >= 2 and len(old.samples[name]) >= 2:
        p_worse, p_better = _noise_pvalues(new.samples[name], old.samples[name], rule)
        p = p_worse if change < 0 else p_better
        finding.detail += f", p={p:.2g}"
        outside = outside and p < alpha
    elif rule.kind == "speed":
        finding.detail += ", no repeats: tolerance only"
    if outside:
        finding.status = "regression" if change < 0 else "improvement"
    return finding


def compare(run: list[Record], baseline: list[Record], config: GateConfig) -> list[Finding]:
    """Every finding of the run against the baseline, matched by (test, model) whatever the machine."""
    by_key = {(r.test, r.model): r for r in baseline}
    findings = []
    seen = set()
    for new in sorted(run, key=lambda r: (r.test, r.model or "")):
        key = (new.test, new.model)
        seen.add(key)
        old = by_key.get(key)
        if old is None:
            findings.append(Finding("new", new.test, new.model, "outcome", "-", new.outcome))
            continue
        if old.outcome in PASSING and new.outcome not in PASSING:
            findings.append(Finding("regression", new.test, new.model, "outcome", old.outcome, new.outcome,
                                    (new.reason or "").splitlines()[0][:120] if new.reason else ""))
        elif old.outcome not in PASSING and new.outcome in PASSING:
            findings.append(Finding("improvement", new.test, new.model, "outcome", old.outcome, new.outcome))
        else:
            findings.append(Finding("unchanged", new.test, new.model, "outcome", old.outcome, new.outcome))
        for name in sorted(set(new.metrics) & set(old.metrics)):
            rule = rule_for(name, config.rules)
            if rule is None:
                findings.append(Finding("ungated", new.test, new.model, name, f"{old.metrics[name]:.4g}",
                                        f"{new.metrics[name]:.4g}", "no rule for this metric"))
            elif rule.kind != "info":
                findings.append(compare_metric(name, new, old, rule, config.alpha))
    tiers = {r.tier for r in run}  # a run of the exactness tier does not miss the baseline's benchmarks
    for old in sorted(baseline, key=lambda r: (r.test, r.model or "")):
        if (old.test, old.model) not in seen and old.outcome in PASSING and old.tier in tiers:
            findings.append(Finding("missing", old.test, old.model, "outcome", old.outcome, "-", "not in this run"))
    return findings


STATUS_ORDER = ("regression", "missing", "ungated", "improvement", "new", "unchanged")


def markdown(findings: list[Finding], run_desc: str, baseline_desc: str) -> str:
    counts = {status: sum(f.status == status for f in findings) for status in STATUS_ORDER}
    verdict = "FAIL" if counts["regression"] else "pass"
    lines = [f"## exactbench gate: {verdict}", "",
             f"Run {run_desc} against baseline {baseline_desc}: "
             + ", ".join(f"{n} {status}" for status, n in counts.items() if n) + ".", ""]

    def table(rows: list[Finding]) -> list[str]:
        out = ["| status | test | model | what | baseline | run | change |", "|---|---|---|---|---|---|---|"]
        out += [f"| {f.status} | `{f.test}` | {f.model or ''} | {f.what} | {f.baseline} | {f.run} | {f.detail} |"
                for f in rows]
        return out + [""]

    shown = [f for f in findings if f.status in ("regression", "missing", "ungated", "improvement")]
    if shown:
        lines += table(sorted(shown, key=lambda f: STATUS_ORDER.index(f.status)))
    quiet = [f for f in findings if f.status in ("unchanged", "new")]
    if quiet:
        lines += [f"<details><summary>{len(quiet)} unchanged or new</summary>", ""] + table(quiet) + ["</details>", ""]
    return "\n".join(lines)


def junit_xml(findings: list[Finding]) -> str:
    suite = ET.Element("testsuite", name="exactbench-gate", tests=str(len(findings)),
                       failures=str(sum(f.status == "regression" for f in findings)))
    for f in findings:
        case = ET.SubElement(suite, "testcase", classname=f"{f.test} [{f.model}]", name=f.what)
        if f.status == "regression":
            ET.SubElement(case, "failure", message=f"{f.what}: {f.baseline} -> {f.run} {f.detail}".strip())
        elif f.status in ("missing", "ungated"):
            ET.SubElement(case, "skipped", message=f"{f.status}: {f.detail}")
    return ET.tostring(suite, encoding="unicode", xml_declaration=True) + "\n"


def update_baseline(run_sources: list[Path], baseline: Path) -> Path:
    """Make the run the baseline: its run files join a baseline directory (the latest record wins), or a baseline
    file is rewritten with the run's latest records."""
    if baseline.is_dir():
        for path in run_files(run_sources):
            if path.resolve().parent != baseline.resolve():
                shutil.copy2(path, baseline / path.name)
        return baseline
    records = load_records(run_sources)
    header = run_header({"baseline from": [str(s) for s in run_sources]})
    write_atomic(baseline, "\n".join([dumps({"run": header})] + [dumps(asdict(r)) for r in records]) + "\n")
    return baseline


def main_gate(args) -> int:
    """python -m harness gate: see the module docstring."""
    problems: list[str] = []
    try:
        config = GateConfig.load(args.config)
        baseline_path = args.baseline or config.baseline
        if args.update_baseline:
            print(f"baseline updated: {update_baseline(args.runs, baseline_path)}")
            return 0
        run = load_records(args.runs, problems.append)
        baseline = load_records([baseline_path], problems.append)
    except (ValueError, RecordsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)
    if not baseline:
        print(f"error: baseline {baseline_path} holds no readable records", file=sys.stderr)
        return 2
    if not run:
        print(f"error: run {' '.join(map(str, args.runs))} holds no readable records", file=sys.stderr)
        return 2
    findings = compare(run, baseline, config)
    text = markdown(findings, " ".join(map(str, args.runs)), str(baseline_path))
    print(text)
    summary = args.summary
    if summary:
        with open(summary, "a", encoding="utf-8") as handle:
            handle.write(text + "\n")
    if args.junit:
        write_atomic(args.junit, junit_xml(findings))
    return 1 if any(f.status == "regression" for f in findings) else 0


def add_gate_arguments(parser) -> None:
    import os

    parser.add_argument("runs", nargs="*", type=Path, default=[Path(".exactbench/results/records")],
                        help="run files or directories of the run to judge (default: .exactbench/results/records, "
                             "where plain pytest writes)")
    parser.add_argument("--baseline", type=Path,
                        help="baseline run file or directory (default: [tool.exactbench.gate] baseline, "
                             "else results/records)")
    parser.add_argument("--config", type=Path, help="TOML file with a [tool.exactbench.gate] table "
                                                    "(default: pyproject.toml)")
    parser.add_argument("--junit", type=Path, help="also write a JUnit XML report here")
    parser.add_argument("--summary", type=Path, default=os.environ.get("GITHUB_STEP_SUMMARY") or None,
                        help="append the Markdown report to this file (default: $GITHUB_STEP_SUMMARY when set)")
    parser.add_argument("--update-baseline", action="store_true",
                        help="make the run the baseline instead of judging it")
