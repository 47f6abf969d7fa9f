"""Serving workloads, deterministic by seed (vLLM's `bench serve` conventions).

Arrivals come from a gamma process: inter-arrival gaps ~ Gamma(shape=burstiness, scale=1/(rate*burstiness)),
so burstiness 1 is a Poisson process and smaller values are burstier; the gaps are then rescaled so the
sending window is exactly N/rate. Rate infinity sends everything at time 0. Prompt and output lengths come
from a profile; prompt tokens are consecutive slices of held-out standard-library text in the model's own
tokenizer (seeded random tokens for a model without one).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from backends.checkpoint import Checkpoint
from backends.algorithms.serving import Request

from . import corpus


@dataclass(frozen=True)
class Profile:
    """Prompt lengths uniform in [prompt_min, prompt_max]; output lengths fixed, or log-normal (heavy-tailed)
    with median `output` and shape `output_sigma`, clipped to [1, output_max]. `shared_prefix` tokens of a
    system prompt start the prompt of a `sharing` fraction of the requests."""

    prompt_min: int
    prompt_max: int
    output: int
    output_sigma: float = 0.0
    output_max: int = 0
    shared_prefix: int = 0


PROFILES = {
    "fixed": Profile(64, 64, 32),
    "heavy-tailed": Profile(16, 96, 12, output_sigma=1.0, output_max=128),
    "shared-prefix": Profile(16, 48, 8, shared_prefix=128),
}


DEFAULT_BURSTINESS = 1.0  # Poisson arrivals


def parse_burstiness(text: str) -> float:
    """A `--burstiness` value; a bad one is a one-line ValueError naming what is accepted."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise ValueError(f"bad --burstiness {text!r}: accepted a positive number (1: Poisson arrivals, below 1: "
                         "burstier, above 1: more regular)")
    return value


def arrival_times(n: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Seconds at which each of n requests is sent."""
    if not burstiness > 0:
        raise ValueError(f"burstiness {burstiness!r}; accepted: a positive number")
    if math.isinf(rate):
        return [0.0] * n
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)
    times = np.cumsum(gaps) - gaps[0]  # the first request at time 0
    if n > 1 and times[-1] > 0:
        times *= (n / rate) / times[-1]  # the sending window rescaled to N / rate
    return times.tolist()


@cache
def heldout_stream(tokenizer_dir: Path | None, vocab_size: int) -> tuple[int, ...]:
    """Held-out standard-library text in the tokenizer of `tokenizer_dir`, or seeded random tokens."""
    if tokenizer_dir is None:
        return tuple(np.random.default_rng(0).integers(1, vocab_size, 200_000).tolist())
    from .training import load_tokenizer

    _, heldout = corpus.split(corpus.documents())
    tokenizer = load_tokenizer(tokenizer_dir)
    return tuple(i for encoding in tokenizer.encode_batch([d.text for d in heldout[:40]]) for i in encoding.ids)


def token_stream(checkpoint: Checkpoint) -> tuple[int, ...]:
    directory = checkpoint.directory
    has_tokenizer = directory is not None and (directory / "tokenizer.json").exists()
    return heldout_stream(directory if has_tokenizer else None, checkpoint.config.vocab_size)


def system_prompt(checkpoint: Checkpoint, profile: Profile) -> tuple[int, ...]:
    """The prefix a sharing request's prompt starts with."""
    return token_stream(checkpoint)[: profile.shared_prefix]


def make_requests(checkpoint: Checkpoint, profile: Profile, n: int, rate: float = math.inf,
                  burstiness: float = DEFAULT_BURSTINESS, sharing: float = 0.0, seed: int = 0) -> list[Request]:
    """n requests of `profile` arriving at `rate` per second (arrival times in seconds)."""
    stream = token_stream(checkpoint)
    rng = np.random.default_rng(seed)
    prefix = system_prompt(checkpoint, profile)
    shared = rng.permutation(n) < round(sharing * n)  # exactly that fraction of the requests
    requests = []
    for i, arrival in enumerate(arrival_times(n, rate, burstiness, seed)):
        length = int(rng.integers(profile.prompt_min, profile.prompt_max + 1))
        start = int(rng.integers(profile.shared_prefix, len(stream) - length))
        prompt = (prefix if shared[i] else ()) + stream[start: start + length]
        output = profile.output
        if profile.output_sigma:
            output = int(np.clip(round(rng.lognormal(math.log(profile.output), profile.output_sigma)), 1,
                                 profile.output_max))
        requests.append(Request(i, prompt, output, arrival))
    return requests
