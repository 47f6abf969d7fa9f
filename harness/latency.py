"""Serving metrics from completions, with vLLM's `bench serve` definitions.

TTFT = first token time - arrival; E2EL = last token time - arrival; TPOT = (E2EL - TTFT) / (n_out - 1), for
requests with more than one output token; ITL = every gap between consecutive tokens of a request. Throughputs
divide by the benchmark's duration (first arrival to last token) and count tokens actually generated.
Latencies are reported in milliseconds as mean, p50, p90 and p99.
"""
from __future__ import annotations

import numpy as np

from backends.algorithms.serving import Completion

PERCENTILES = (50, 90, 99)


def summary(name: str, values_s: list[float]) -> dict[str, float]:
    values = np.asarray(values_s, dtype=float) * 1000.0
    if not len(values):
        return {}
    out = {f"{name}_mean_ms": float(values.mean())}
    out.update({f"{name}_p{p}_ms": float(np.percentile(values, p)) for p in PERCENTILES})
    return out


def serving_metrics(completions: list[Completion]) -> dict[str, float]:
    start = min(c.request.arrival for c in completions)
    duration = max(c.finish_time for c in completions) - start
    ttft = [c.first_token_time - c.request.arrival for c in completions]
    e2el = [c.finish_time - c.request.arrival for c in completions]
    tpot = [(e - t) / (len(c.tokens) - 1) for c, e, t in zip(completions, e2el, ttft) if len(c.tokens) > 1]
    itl = [b - a for c in completions for a, b in zip(c.token_times, c.token_times[1:])]
    output_tokens = sum(len(c.tokens) for c in completions)
    metrics = {"duration_s": duration, "requests": float(len(completions)), "output_tokens": float(output_tokens),
               "request_throughput": len(completions) / duration, "output_throughput": output_tokens / duration}
    for name, values in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2el", e2el)):
        metrics.update(summary(name, values))
    return metrics
