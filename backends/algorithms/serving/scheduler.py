"""The scheduler decides, every step, which sequences run and how many tokens each brings. No tensors here.

`ContinuousScheduler` is iteration-level scheduling (Orca; vLLM's scheduler): sequences are admitted and
retired at every step. A step has a token budget (`step_tokens`, chunked prefill): running sequences come
first, in the order they were admitted, each with its next decode token or its next prefill chunk; then
waiting requests that have arrived are admitted in arrival order while the budget, `max_batch` and memory
last. When memory runs out for a running sequence, the most recently admitted one is preempted: its memory
is released and it waits again at the head of the queue, to be recomputed from its prompt and the tokens it
has generated so far (vLLM's recompute preemption).

`next_static_batch` is static batching: fixed groups in arrival order, each run until its longest request ends.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager, RowPool
from .request import Request


@dataclass(eq=False)
class Sequence:
    request: Request
    tokens: list[int]  # the prompt, then every token generated so far
    n_computed: int = 0  # tokens whose keys and values are in the cache
    cached_tokens: list[int] = field(default_factory=list)  # prefix-cache hits, at each admission
    prefill_steps: int = 0

    @property
    def id(self) -> int:
        return self.request.id

    @property
    def n_generated(self) -> int:
        return len(self.tokens) - len(self.request.prompt)

    @property
    def finished(self) -> bool:
        return self.n_generated >= self.request.max_new_tokens


@dataclass
class Chunk:
    """`count` tokens of `seq` from index `start` (their positions too). It samples when it reaches the end of the
    sequence's tokens: its last logits choose the next token."""

    seq: Sequence
    start: int
    count: int

    @property
    def samples(self) -> bool:
        return self.start + self.count == len(self.seq.tokens)


@dataclass
class StepPlan:
    chunks: list[Chunk]
    admitted: list[Sequence]  # new owners of memory (a contiguous row to empty first)
    preempted: list[Sequence]


class ContinuousScheduler:
    def __init__(self, memory: RowPool | BlockManager, max_batch: int, step_tokens: int):
        self.memory, self.max_batch, self.step_tokens = memory, max_batch, step_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(Sequence(request, list(request.prompt)))

    @property
    def done(self) -> bool:
        return not self.waiting and not self.running

    def next_arrival(self) -> int:
        return self.waiting[0].request.arrival

    def schedule(self, now: int) -> StepPlan:
        budget, chunks, preempted, admitted = self.step_tokens, [], [], []
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            count = min(len(seq.tokens) - seq.n_computed, budget)
            while not self.memory.grow(seq.id, seq.n_computed + count):
                victim = self.running.pop()
                self.preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq in preempted:
                break
            chunks.append(Chunk(seq, seq.n_computed, count))
            budget -= count
            index += 1
        while (not preempted and budget > 0 and self.waiting and self.waiting[0].request.arrival <= now
               and len(self.running) < self.max_batch):
            seq = self.waiting[0]
            cached = self.memory.admit(seq.id, seq.tokens)
            if cached is None:
                break
            count = min(len(seq.tokens) - cached, budget)
            if not self.memory.grow(seq.id, cached + count):
                self.memory.release(seq.id)
                break
            self.waiting.popleft()
            seq.n_computed = cached
            seq.cached_tokens.append(cached)
            self.running.append(seq)
            admitted.append(seq)
            chunks.append(Chunk(seq, cached, count))
            budget -= count
        if not chunks and not self.running and self.waiting and self.waiting[0].request.arrival <= now:
            request = self.waiting[0].request
            raise RuntimeError(f"request {request.id} ({len(self.waiting[0].tokens)} tokens) cannot be admitted into "
                               "empty memory: the KV budget is too small for it")
        return StepPlan(chunks, admitted, preempted)

    def preempt(self, seq: Sequence) -> None:
        self.memory.release(seq.id)
        seq.n_computed = 0
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def update(self, plan: StepPlan, sampled: dict[int, int]) -> list[Sequence]:
        """Advance each scheduled sequence by its chunk and append its sampled token; return the ones that finished."""
        finished = []
        for chunk in plan.chunks:
            seq = chunk.seq
            seq.n_computed += chunk.count
            if seq.n_generated == 0:  # a chunk of the first prefill
                seq.prefill_steps += 1
            self.memory.computed(seq.id, seq.tokens, seq.n_computed)
            if chunk.samples:
                seq.tokens.append(sampled[seq.id])
                if seq.finished:
                    self.running.remove(seq)
                    self.memory.release(seq.id)
                    finished.append(seq)
        return finished


def next_static_batch(waiting: deque[Request], now: int, batch_size: int) -> list[Request]:
    """Static batching's next group: up to `batch_size` of the requests that have arrived by `now`, in arrival
    order (`waiting` is sorted by arrival). The batch runs until its longest request ends."""
    batch = []
    while waiting and waiting[0].arrival <= now and len(batch) < batch_size:
        batch.append(waiting.popleft())
    return batch
