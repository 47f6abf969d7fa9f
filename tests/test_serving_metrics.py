"""Serving metrics (harness/latency.py) on completions with known times: vLLM's goodput definition."""
import pytest
import torch

from backends.algorithms.serving import Completion, Request
from harness.latency import parse_slo, serving_metrics, slo_label


def completion(request_id: int, arrival: float, token_times: list[float]) -> Completion:
    request = Request(request_id, (1, 2), len(token_times), arrival)
    return Completion(request, [1] * len(token_times), torch.zeros(len(token_times), 4), [0], token_times)


COMPLETIONS = [
    completion(0, 0.0, [0.1, 0.12, 0.14]),  # TTFT 100 ms, TPOT 20 ms, E2EL 140 ms
    completion(1, 0.0, [0.3, 0.31, 0.32]),  # TTFT 300 ms, TPOT 10 ms
    completion(2, 1.0, [1.05]),  # TTFT 50 ms, one token: TPOT 0 (vLLM), E2EL 50 ms
    completion(3, 1.0, [1.2, 1.6]),  # TTFT 200 ms, TPOT 400 ms, E2EL 600 ms: the run ends at 1.6 s
]


@pytest.mark.parametrize("slo, good", [
    ({"ttft": 250}, [0, 2, 3]),
    ({"tpot": 15}, [1, 2]),
    ({"ttft": 250, "tpot": 25}, [0, 2]),
    ({"e2el": 140}, [0, 2]),
    ({"ttft": 10}, []),
])
def test_goodput_counts_the_requests_meeting_every_objective(slo, good):
    metrics = serving_metrics(COMPLETIONS, slo)
    assert metrics["goodput"] == pytest.approx(len(good) / 1.6)
    assert metrics["slo_met_pct"] == pytest.approx(100 * len(good) / 4)
    assert metrics["request_throughput"] == pytest.approx(4 / 1.6)


def test_no_slo_no_goodput():
    assert "goodput" not in serving_metrics(COMPLETIONS)


def test_slo_parses_and_prints():
    slo = parse_slo(["tpot:50", "ttft:500", "e2el:2000.5"])
    assert slo == {"tpot": 50.0, "ttft": 500.0, "e2el": 2000.5}
    assert slo_label(slo) == "ttft:500 tpot:50 e2el:2000.5"


@pytest.mark.parametrize("text", ["ttft", "ttft:", "ttft:fast", "ttft:0", "ttft:-5", "ttft:inf", "itl:50", ":50"])
def test_bad_slo_is_a_one_line_error(text):
    with pytest.raises(ValueError) as error:
        parse_slo([text])
    assert str(error.value) == (f"bad --slo {text!r}: accepted NAME:MILLISECONDS with NAME one of ttft, tpot, e2el "
                                "and a positive number, e.g. ttft:500")
