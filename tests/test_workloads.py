"""Serving workloads: gamma arrivals with vLLM's parametrization (shape = burstiness, scale = 1/(rate*burstiness))."""
import math

import numpy as np
import pytest

from harness.workloads import arrival_times, parse_burstiness

N = 40_001  # 40,000 gaps: the sample CV's standard error is under 1.3% even at burstiness 0.25 (excess kurtosis 24)


@pytest.mark.parametrize("burstiness", [0.25, 1.0, 4.0])
def test_gaps_have_the_rate_and_the_gamma_coefficient_of_variation(burstiness):
    rate = 5.0
    gaps = np.diff(arrival_times(N, rate, burstiness, seed=3))
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.01)
    # a gamma of shape k has CV 1/sqrt(k): 1 for Poisson (exponential gaps), 2 at burstiness 0.25
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.05)


def test_arrivals_are_deterministic_by_seed_and_span_n_over_rate():
    times = arrival_times(50, 10.0, 0.5, seed=1)
    assert times == arrival_times(50, 10.0, 0.5, seed=1)
    assert times != arrival_times(50, 10.0, 0.5, seed=2)
    assert times[0] == 0.0 and times[-1] == pytest.approx(50 / 10.0)
    assert all(a <= b for a, b in zip(times, times[1:]))
    assert arrival_times(4, math.inf, 1.0, seed=1) == [0.0] * 4


@pytest.mark.parametrize("text", ["0", "-1", "nan", "inf", "poisson", ""])
def test_bad_burstiness_is_a_one_line_error(text):
    with pytest.raises(ValueError) as error:
        parse_burstiness(text)
    assert str(error.value) == (f"bad --burstiness {text!r}: accepted a positive number (1: Poisson arrivals, below 1: "
                                "burstier, above 1: more regular)")


def test_burstiness_parses():
    assert parse_burstiness("0.5") == 0.5
