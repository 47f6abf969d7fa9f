"""Serving metrics from completions, with vLLM's `bench serve` definitions.

TTFT = first token time - arrival; E2EL = last token time - arrival; TPOT = (E2EL - TTFT) / (n_out - 1), for
requests with more than one output token; ITL = every gap between consecutive tokens of a request. Throughputs
divide by the benchmark's duration (first arrival to last token) and count tokens actually generated.
Latencies are reported in milliseconds as mean, p50, p90 and p99.

Goodput (vLLM's `bench serve --goodput`): requests per second that meet every given service-level objective,
each an upper bound in milliseconds on a request's TTFT, TPOT or E2EL; a request of one output token has TPOT 0
(as vLLM counts it), so it meets any TPOT objective.
"""
from __future__ import annotations

import numpy as np

from backends.algorithms.serving import Completion

PERCENTILES = (50, 90, 99)
SLO_METRICS = ("ttft", "tpot", "e2el")
# the default SLO: on the default model and this kind of machine, low request rates meet it and an all-at-once
# burst does not, so goodput separates the strategies (see results/batching.md)
DEFAULT_SLO = {"ttft": 250.0, "tpot": 15.0}


def parse_slo(texts: list[str]) -> dict[str, float]:
    """`--slo NAME:MS` values (e.g. ttft:500) -> {name: milliseconds}; a bad one is a one-line ValueError."""
    slo = {}
    for text in texts:
        name, _, value = text.partition(":")
        try:
            milliseconds = float(value)
        except ValueError:
            milliseconds = float("nan")
        if name not in SLO_METRICS or not milliseconds > 0 or milliseconds == float("inf"):
            raise ValueError(f"bad --slo {text!r}: accepted NAME:MILLISECONDS with NAME one of "
                             f"{', '.join(SLO_METRICS)} and a positive number, e.g. ttft:500")
        slo[name] = milliseconds
    return slo


def slo_label(slo: dict[str, float]) -> str:
    """The SLO as it is recorded and printed, e.g. 'ttft:250 tpot:15' (milliseconds)."""
    return " ".join(f"{name}:{slo[name]:g}" for name in SLO_METRICS if name in slo)


def summary(name: str, values_s: list[float]) -> dict[str, float]:
    values = np.asarray(values_s, dtype=float) * 1000.0
    if not len(values):
        return {}
    out = {f"{name}_mean_ms": float(values.mean())}
    out.update({f"{name}_p{p}_ms": float(np.percentile(values, p)) for p in PERCENTILES})
    return out


def serving_metrics(completions: list[Completion], slo: dict[str, float] | None = None) -> dict[str, float]:
    """Every metric above; with `slo`, also `goodput` (req/s) and `slo_met_pct` (the share of requests meeting it)."""
    start = min(c.request.arrival for c in completions)
    duration = max(c.finish_time for c in completions) - start
    ttft = [c.first_token_time - c.request.arrival for c in completions]
    e2el = [c.finish_time - c.request.arrival for c in completions]
    tpot_or_0 = [(e - t) / (len(c.tokens) - 1) if len(c.tokens) > 1 else 0.0
                 for c, e, t in zip(completions, e2el, ttft)]
    tpot = [value for c, value in zip(completions, tpot_or_0) if len(c.tokens) > 1]
    itl = [b - a for c in completions for a, b in zip(c.token_times, c.token_times[1:])]
    output_tokens = sum(len(c.tokens) for c in completions)
    metrics = {"duration_s": duration, "requests": float(len(completions)), "output_tokens": float(output_tokens),
               "request_throughput": len(completions) / duration, "output_throughput": output_tokens / duration}
    for name, values in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2el", e2el)):
        metrics.update(summary(name, values))
    if slo:
        per_request = {"ttft": ttft, "tpot": tpot_or_0, "e2el": e2el}
        good = sum(all(per_request[name][i] * 1000.0 <= bound for name, bound in slo.items())
                   for i in range(len(completions)))
        metrics.update(goodput=good / duration, slo_met_pct=100.0 * good / len(completions))
    return metrics
