"""The scheduler decides, every step, which sequences run and how many tokens each brings. No tensors here.

`ContinuousScheduler` is iteration-level scheduling (Orca; vLLM's scheduler): sequences are admitted and
retired at every step. A step has a token budget (`step_tokens`, chunked prefill): running sequences come
first, in the order they were admitted, each with its next decode token or its next prefill chunk; then
waiting requests that have arrived are admitted in arrival order while the budget, `max_batch` and memory
last. When memory runs out for a running sequence, the most recently admitted one is preempted: its memory
is released and it waits again at the head of the queue, to be recomputed from its prompt and the tokens it
has generated so far (vLLM's recompute preemption). A request of several parallel samples is a `SequenceGroup`:
where memory is in blocks, its prompt is computed once and the samples then share its blocks; it is admitted,
counted against `max_batch` and preempted as a whole. Over contiguous rows each sample is a group of its own.

`next_static_batch` is static batching: fixed groups in arrival order, each run until its longest request ends.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager, RowPool
from .request import Request, sample_seed


@dataclass(eq=False)
class Sequence:
    request: Request
    sample: int  # which of the request's parallel samples
    tokens: list[int]  # the prompt, then every token generated so far
    n_computed: int = 0  # tokens whose keys and values are in the cache
    cached_tokens: list[int] = field(default_factory=list)  # prefix-cache hits, at each admission
    prefill_steps: int = 0
    group: SequenceGroup | None = field(default=None, repr=False)

    @property
    def id(self) -> tuple[int, int]:
        return self.request.id, self.sample

    @property
    def seed(self) -> int:
        return sample_seed(self.request.seed, self.sample)

    @property
    def n_generated(self) -> int:
        return len(self.tokens) - len(self.request.prompt)

    @property
    def finished(self) -> bool:
        return self.n_generated >= self.request.max_new_tokens


def sequences_of(request: Request) -> list[Sequence]:
    """A sequence for each of the request's parallel samples, each holding the prompt."""
    return [Sequence(request, sample, list(request.prompt)) for sample in range(request.samples)]


@dataclass(eq=False)
class SequenceGroup:
    """The samples of one request that share its prompt's memory (PagedAttention's parallel sampling). The group
    is admitted as its first unfinished sample alone (the lead), which computes the prompt once; then it forks:
    every unfinished sample holds the prompt's blocks, the last partial one too, and goes on with its own tokens.
    A group of one sample is forked from the start. Preemption takes the whole group; it is recomputed the same way."""

    sequences: list[Sequence]
    forked: bool = field(init=False)  # the samples hold blocks of their own (set by unfork, then fork)

    def __post_init__(self):
        for seq in self.sequences:
            seq.group = self
        self.unfork()

    @property
    def request(self) -> Request:
        return self.sequences[0].request

    @property
    def unfinished(self) -> list[Sequence]:
        return [seq for seq in self.sequences if not seq.finished]

    @property
    def lead(self) -> Sequence:
        return self.unfinished[0]

    def unfork(self) -> None:
        self.forked = len(self.unfinished) == 1

    def limit(self, seq: Sequence) -> int:
        """How many of `seq`'s tokens it computes now: all of them, or only the prompt until the group forks."""
        return len(seq.tokens) if self.forked else len(self.request.prompt)

    def samplers(self, seq: Sequence, end: int) -> list[Sequence]:
        """The sequences that draw their next token from the logits of `seq`'s token end - 1: before the fork, every
        sample that has only its prompt; after, `seq` itself when that token is its last."""
        riding = [seq] if self.forked else self.unfinished
        return [s for s in riding if len(s.tokens) == end]


@dataclass
class Chunk:
    """`count` tokens of `seq` from index `start` (their positions too). Its last logits choose the next token of
    each of `samplers` (several when a group's samples share the prompt's last logits)."""

    seq: Sequence
    start: int
    count: int
    samplers: list[Sequence]


@dataclass
class StepPlan:
    chunks: list[Chunk]
    admitted: list[Sequence]  # new owners of memory (a contiguous row to empty first)
    preempted: list[SequenceGroup]
    copies: list[tuple[int, int]]  # (shared block, its private copy): keys and values to copy before the step


class ContinuousScheduler:
    def __init__(self, memory: RowPool | BlockManager, max_batch: int, step_tokens: int):
        self.memory, self.max_batch, self.step_tokens = memory, max_batch, step_tokens
        self.waiting: deque[SequenceGroup] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0

    def add(self, request: Request) -> None:
        samples = sequences_of(request)
        if self.memory.shares_blocks:
            self.waiting.append(SequenceGroup(samples))
        else:  # each sample computes the prompt into memory of its own
            self.waiting.extend(SequenceGroup([seq]) for seq in samples)

    @property
    def done(self) -> bool:
        return not self.waiting and not self.running

    def next_arrival(self) -> int:
        return self.waiting[0].request.arrival

    def schedule(self, now: int) -> StepPlan:
        budget, chunks, preempted, admitted = self.step_tokens, [], [], []
        for seq in list(self.running):
            if budget <= 0 or seq.group in preempted:
                break
            count = min(seq.group.limit(seq) - seq.n_computed, budget)
            while not self.memory.grow(seq.id, seq.n_computed, seq.n_computed + count):
                victim = self.running[-1].group
                self.preempt(victim)
                preempted.append(victim)
                if victim is seq.group:
                    break
            if seq.group in preempted:
                chunks = [c for c in chunks if c.seq.group is not seq.group]  # its samples scheduled before it
                break
            chunks.append(Chunk(seq, seq.n_computed, count, seq.group.samplers(seq, seq.n_computed + count)))
            budget -= count
        while (not preempted and budget > 0 and self.waiting and self.waiting[0].request.arrival <= now
               and len(self.running) + len(self.waiting[0].unfinished) <= self.max_batch):
            group = self.waiting[0]
            seq = group.lead
            cached = self.memory.admit(seq.id, seq.tokens[:group.limit(seq)])
            if cached is None:
                break
            count = min(group.limit(seq) - cached, budget)
            if not self.memory.grow(seq.id, cached, cached + count):
                self.memory.release(seq.id)
                break
            self.waiting.popleft()
            seq.n_computed = cached
            for sample in group.unfinished:  # the samples share the lead's admission
                sample.cached_tokens.append(cached)
            self.running.append(seq)
            admitted.append(seq)
            chunks.append(Chunk(seq, cached, count, group.samplers(seq, cached + count)))
            budget -= count
        if not chunks and not self.running and self.waiting and self.waiting[0].request.arrival <= now:
            request = self.waiting[0].request
            raise RuntimeError(f"request {request.id} ({len(self.waiting[0].lead.tokens)} tokens) cannot be admitted "
                               "into empty memory: the KV budget is too small for it")
        return StepPlan(chunks, admitted, preempted, self.memory.take_copies())

    def preempt(self, group: SequenceGroup) -> None:
        for seq in group.unfinished:
            if seq in self.running:
                self.running.remove(seq)
                self.memory.release(seq.id)
            seq.n_computed = 0
        group.unfork()
        self.waiting.appendleft(group)
        self.preemptions += 1

    def fork(self, group: SequenceGroup) -> None:
        """The lead has computed the prompt: every other unfinished sample takes its blocks, right after it."""
        lead = group.lead
        at = self.running.index(lead)
        for offset, seq in enumerate(group.unfinished[1:], start=1):
            self.memory.fork(lead.id, seq.id)
            seq.n_computed = lead.n_computed
            self.running.insert(at + offset, seq)
        group.forked = True

    def update(self, plan: StepPlan, sampled: dict[tuple[int, int], int]) -> list[Sequence]:
        """Advance each scheduled sequence by its chunk, fork a group whose prompt is now computed, append each
        sampled token; return the sequences that finished."""
        finished = []
        for chunk in plan.chunks:
            seq, group = chunk.seq, chunk.seq.group
            seq.n_computed += chunk.count
            if seq.n_generated == 0:  # a chunk of the first prefill
                seq.prefill_steps += 1
            self.memory.computed(seq.id, seq.tokens, seq.n_computed)
            if not group.forked and seq.n_computed == len(group.request.prompt):
                self.fork(group)
            for sample in chunk.samplers:
                sample.tokens.append(sampled[sample.id])
                if sample.finished:
                    self.running.remove(sample)
                    self.memory.release(sample.id)
                    finished.append(sample)
        return finished


def next_static_batch(waiting: deque[Sequence], now: int, batch_size: int) -> list[Sequence]:
    """Static batching's next group: up to `batch_size` of the sequences (each sample of each request) that have
    arrived by `now`, in arrival order (`waiting` is sorted by arrival). The batch runs until its longest ends."""
    batch = []
    while waiting and waiting[0].request.arrival <= now and len(batch) < batch_size:
        batch.append(waiting.popleft())
    return batch
