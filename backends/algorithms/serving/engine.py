"""The serving loop of each strategy: the scheduler decides, the block manager owns memory, a step runner computes.

Time is kept by a clock: `StepClock` counts engine steps (one model call each; exactness tests: arrivals at
steps, reproducible anywhere), `WallClock` counts seconds (measurements). A request arrives at a time of its
clock and each of its tokens is stamped with the time it was chosen. When nothing runs and the next request
has not arrived, the clock skips ahead to its arrival: an idle server waits, and the wait is not measured work.
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass

import torch

from backends.base import ModelRunner, PagedKVCache
from backends.strategies import Batching

from .block_manager import BlockManager, RowPool
from .request import Completion, Request, ServingConfig, ServingResult, ServingStats
from .runner import ContiguousStepRunner, PagedStepRunner, StaticBatchRunner
from .scheduler import ContinuousScheduler, Sequence, next_static_batch, sequences_of

PAGED = (Batching.PAGED, Batching.PAGED_PREFIX)


@dataclass
class PagedMemory:
    """A block pool and the manager of its blocks; several serve() calls (even of different models of the same
    shape) may share one, which is where the prefix cache's salt matters."""

    blocks: BlockManager
    cache: PagedKVCache


def model_salt(model: ModelRunner) -> str:
    """What keeps one model's (or strategy's) cached blocks from ever matching another's."""
    return f"{model.checkpoint.name}|{model.strategy.id}"


def max_seq_len(model: ModelRunner, config: ServingConfig) -> int:
    return config.max_seq_len or model.config.max_position_embeddings


def paged_memory(model: ModelRunner, config: ServingConfig) -> PagedMemory:
    n_blocks = config.kv_tokens // config.block_size
    blocks = BlockManager(n_blocks, config.block_size, prefix_caching=config.batching is Batching.PAGED_PREFIX,
                          order_seed=config.block_order_seed)
    return PagedMemory(blocks, model.new_paged_cache(n_blocks, config.block_size, config.pool_fill))


def check_requests(model: ModelRunner, requests: list[Request], config: ServingConfig) -> None:
    """One-line errors naming the bad value and what is accepted."""
    longest = max_seq_len(model, config)
    if len({r.id for r in requests}) != len(requests):
        raise ValueError(f"request ids {[r.id for r in requests]} repeat; accepted: distinct ids")
    for r in requests:
        total = len(r.prompt) + r.max_new_tokens
        if not r.prompt or r.max_new_tokens < 1:
            raise ValueError(f"request {r.id}: {len(r.prompt)} prompt tokens and max_new_tokens {r.max_new_tokens}; "
                             "accepted: at least 1 of each")
        if not isinstance(r.samples, int) or r.samples < 1:
            raise ValueError(f"request {r.id}: samples {r.samples!r}; accepted: a positive integer")
        if total > longest:
            raise ValueError(f"request {r.id}: {len(r.prompt)} prompt + {r.max_new_tokens} new tokens = {total} exceed "
                             f"the maximum sequence length {longest}; accepted: at most {longest}")
        if config.batching in PAGED:
            if r.samples > config.max_batch:
                raise ValueError(f"request {r.id}: {r.samples} samples run together, over max_batch "
                                 f"{config.max_batch}; accepted: at most {config.max_batch}")
            # the prompt's full blocks shared by the samples, the rest of the blocks of each one its own
            shared = len(r.prompt) // config.block_size
            need = (shared + r.samples * (-(-total // config.block_size) - shared)) * config.block_size
            if need > config.kv_tokens // config.block_size * config.block_size:
                samples = f", {r.samples} samples" if r.samples > 1 else ""
                raise ValueError(f"KV budget of {config.kv_tokens} tokens cannot hold request {r.id} ({len(r.prompt)} "
                                 f"prompt + {r.max_new_tokens} new tokens{samples} in blocks of {config.block_size}); "
                                 f"accepted: a budget of at least {need} tokens")
    if config.batching is Batching.CONTINUOUS and config.kv_tokens < longest:
        raise ValueError(f"KV budget of {config.kv_tokens} tokens is smaller than one request's reservation of "
                         f"{longest} tokens (continuous reserves the maximum sequence length per request); "
                         f"accepted: at least {longest}")


def serve(model: ModelRunner, requests: list[Request], config: ServingConfig, memory: PagedMemory | None = None,
          clock: StepClock | WallClock | None = None) -> ServingResult:
    """Serve `requests` under `config.batching`; `memory` (paged strategies) reuses a pool and its prefix cache;
    `clock` (default: steps) is what request arrivals and token stamps are counted in."""
    check_requests(model, requests, config)
    clock = clock or StepClock()
    if config.batching in (Batching.SEQUENTIAL, Batching.STATIC):
        batch_size = 1 if config.batching is Batching.SEQUENTIAL else config.max_batch
        return serve_static(model, requests, batch_size, clock)
    if config.batching is Batching.CONTINUOUS:
        rows = RowPool(min(config.kv_tokens // max_seq_len(model, config), config.max_batch))
        step_runner = ContiguousStepRunner(model, rows, len(rows.free_rows), max_seq_len(model, config))
        scheduler = ContinuousScheduler(rows, config.max_batch, config.step_tokens)
    else:
        memory = memory or paged_memory(model, config)
        memory.blocks.salt = model_salt(model)
        step_runner = PagedStepRunner(model, memory.blocks, memory.cache)
        scheduler = ContinuousScheduler(memory.blocks, config.max_batch, config.step_tokens)
    return serve_continuous(scheduler, step_runner, requests, memory, clock)


class StepClock:
    """Time in engine steps."""

    def __init__(self):
        self.steps = 0

    def now(self) -> float:
        return float(self.steps)

    def tick(self) -> None:
        self.steps += 1

    def skip_to(self, when: float) -> None:
        self.steps = max(self.steps, int(math.ceil(when)))


class WallClock:
    """Time in seconds since the clock was made; an idle wait for an arrival is skipped, not slept."""

    def __init__(self):
        self.start = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self.start

    def tick(self) -> None:
        pass

    def skip_to(self, when: float) -> None:
        self.start -= max(0.0, when - self.now())


class Stamps:
    """The clock's time of every token of every request."""

    def __init__(self, clock):
        self.clock = clock
        self.times: dict[int, list[float]] = {}

    def add(self, seq: Sequence) -> None:
        self.times.setdefault(seq.id, []).append(self.clock.now())

    def completion(self, seq: Sequence, sampler) -> Completion:
        return Completion(seq.request, seq.tokens[len(seq.request.prompt):], torch.stack(sampler.logits[seq.id]),
                          seq.cached_tokens, self.times[seq.id], seq.sample)


def serve_static(model: ModelRunner, requests: list[Request], batch_size: int, clock) -> ServingResult:
    """Every sample of a request is a sequence of its own, computing the prompt itself (no memory is shared)."""
    sequences = [seq for request in requests for seq in sequences_of(request)]
    waiting = deque(sorted(sequences, key=lambda s: (s.request.arrival, s.id)))
    runner, stamps, stats = StaticBatchRunner(model), Stamps(clock), ServingStats()
    while waiting:
        clock.skip_to(waiting[0].request.arrival)
        batch = next_static_batch(waiting, clock.now(), batch_size)
        stats.max_running = max(stats.max_running, len(batch))
        chosen = runner.start(batch)
        for step in range(max(s.request.max_new_tokens for s in batch)):
            if step:
                chosen = runner.step(chosen, step)
            for seq, token in zip(batch, chosen):
                if step < seq.request.max_new_tokens:
                    seq.tokens.append(token)
                    stamps.add(seq)
            stats.add_step(reserved=runner.cache.capacity * len(batch),
                           used=sum(len(s.request.prompt) + min(step, s.request.max_new_tokens) for s in batch))
            clock.tick()
    for seq in sequences:
        seq.cached_tokens.append(0)
    return ServingResult([stamps.completion(seq, runner.sampler) for seq in sequences], stats)


def serve_continuous(scheduler: ContinuousScheduler, step_runner, requests: list[Request],
                     memory: PagedMemory | None, clock) -> ServingResult:
    for request in sorted(requests, key=lambda r: (r.arrival, r.id)):
        scheduler.add(request)
    stamps, stats, sequences = Stamps(clock), ServingStats(), {}
    for group in scheduler.waiting:
        for seq in group.sequences:
            sequences[seq.id] = seq
    while not scheduler.done:
        if not scheduler.running:
            clock.skip_to(scheduler.next_arrival())  # idle until the next request arrives
        plan = scheduler.schedule(clock.now())
        stats.preemptions += len(plan.preempted)
        if plan.chunks:
            decoding = [c.count == 1 and c.seq.n_generated > 0 and bool(c.samplers) for c in plan.chunks]
            stats.mixed_steps += any(decoding) and not all(decoding)
            sampled = step_runner.run(plan)
            stats.max_running = max(stats.max_running, len(scheduler.running))
            stats.add_step(reserved=step_runner.reserved_tokens(scheduler.running),
                           used=sum(seq.n_computed for seq in scheduler.running) + sum(c.count for c in plan.chunks))
            if memory is not None:
                stats.peak_blocks_held = max(stats.peak_blocks_held, memory.blocks.held)
            for chunk in plan.chunks:
                for seq in chunk.samplers:
                    stamps.add(seq)
            scheduler.update(plan, sampled)
        clock.tick()
    stats.chunked_prompts = sum(seq.prefill_steps > 1 for seq in sequences.values())
    if memory is not None:
        stats.block_accounting = memory.blocks.accounting()
    completions = [stamps.completion(sequences[r.id, i], step_runner.sampler) for r in requests
                   for i in range(r.samples)]
    return ServingResult(completions, stats)
