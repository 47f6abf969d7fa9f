"""Requests, their completions and the serving parameters (every default defined here, once)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from backends.algorithms.generation import GREEDY, Sampling
from backends.strategies import Batching

DEFAULT_BLOCK_SIZE = 16


@dataclass(frozen=True)
class Request:
    id: int
    prompt: tuple[int, ...]
    max_new_tokens: int
    arrival: float = 0  # when the request arrives, on the engine's clock (steps or seconds)
    sampling: Sampling = GREEDY
    seed: int = 0  # of the request's own generator: its draws do not depend on the batch it runs in
    samples: int = 1  # parallel samples of the prompt (vLLM's n), each with its own generator (sample_seed)


def sample_seed(seed: int, sample: int) -> int:
    """The generator seed of a request's sample: the request's own for sample 0 (a one-sample request draws as it
    always did), a hash of (seed, sample) for the others, so nearby request seeds never share a stream."""
    if sample == 0:
        return seed
    return int.from_bytes(hashlib.sha256(f"{seed}/{sample}".encode()).digest()[:8], "little") >> 1


@dataclass
class Completion:
    request: Request
    tokens: list[int]
    logits: torch.Tensor  # (n, V): the logits each new token was chosen from
    cached_tokens: list[int]  # prompt tokens found in the prefix cache, at each admission (preemption re-admits)
    token_times: list[float]  # when each token was chosen, on the engine's clock (steps or seconds)
    sample: int = 0  # which of the request's parallel samples

    @property
    def first_token_time(self) -> float:
        return self.token_times[0]

    @property
    def finish_time(self) -> float:
        return self.token_times[-1]


@dataclass(frozen=True)
class ServingConfig:
    """How a strategy serves. `kv_tokens` is the KV budget in tokens: `continuous` reserves `max_seq_len`
    slots per running sequence out of it, the paged strategies cut it into blocks of `block_size`; `static`
    and `sequential` reserve each batch's longest prompt plus its longest output per row, whatever the budget."""

    batching: Batching
    max_batch: int = 16  # a static batch's size; the most sequences running at once
    step_tokens: int = 512  # chunked prefill: prefill and decode tokens of one step together
    kv_tokens: int = 4096
    block_size: int = DEFAULT_BLOCK_SIZE
    max_seq_len: int | None = None  # None: the model's maximum positions
    block_order_seed: int | None = None  # shuffle the free block list (tests: random permuted block tables)
    pool_fill: float = 0.0  # every pool slot's value before any write (tests: NaN, so a stray read shows)

    def __post_init__(self):
        for name in ("max_batch", "step_tokens", "kv_tokens", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                label = name.replace("_", " ")
                raise ValueError(f"{label} {value!r}; accepted: a positive integer")


@dataclass
class ServingStats:
    steps: int = 0
    preemptions: int = 0
    mixed_steps: int = 0  # steps that ran a prefill chunk beside decode tokens
    chunked_prompts: int = 0  # prompts whose prefill was split across steps
    max_running: int = 0
    reserved_token_steps: int = 0  # KV slots reserved for running requests, summed over steps
    used_token_steps: int = 0  # of which holding a token
    peak_blocks_held: int = 0  # paged: the most pool blocks held at once (a block shared by n sequences counts once)
    block_accounting: dict[str, int] = field(default_factory=dict)  # the block manager's, after the last request

    def add_step(self, reserved: int, used: int) -> None:
        self.steps += 1
        self.reserved_token_steps += reserved
        self.used_token_steps += used

    @property
    def kv_waste(self) -> float:
        """The fraction of reserved KV slots that held no token, over all steps."""
        return 1.0 - self.used_token_steps / self.reserved_token_steps if self.reserved_token_steps else 0.0


@dataclass
class ServingResult:
    completions: list[Completion]  # in the order the requests were given, each request's samples in order
    stats: ServingStats
