"""Speculative decoding over the adapter contract: any drafter, any target runner, any backends.

One round, per row (the sampler is backends/rejection_sampler.py):

    the target cache holds every token but the last one, `pending`;
    the drafter proposes d_1..d_k (with their distributions q_1..q_k);
    the target runs [pending, d_1..d_k] in one forward pass -> p_1..p_{k+1};
    the sampler accepts d_1..d_n and draws one more token t; the row emits d_1..d_n, t;
    both caches are truncated to [.., pending, d_1..d_n] and t becomes the new pending token.

Rows accept independently. A row that already has its tokens keeps riding along in the batch (the contract
cannot drop a row from a cache) but its caches are rolled back to where they were, so they never grow.
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields

import torch

from backends.base import KVCache, ModelRunner
from .generation import GREEDY, PAD_TOKEN, Sampling, left_pad
from .rejection_sampler import distribution, draw, one_hot, single_threaded, verify


class Drafter(ABC):
    """Proposes draft tokens and their distributions, and rolls its own state back after verification."""

    @abstractmethod
    def start(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, capacity: int) -> None:
        """A new batch: the left-padded prompts (B, T); every column but the last is context already seen."""

    @abstractmethod
    def propose(self, history: list[list[int]], pending: torch.Tensor, positions: torch.Tensor, k: int,
                sampling: Sampling, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Draft up to k tokens after `pending` (B,) at `positions` (B,); `history` holds each row's real tokens
        up to and including pending. Returns tokens (B, k') and their distributions (B, k', V), k' <= k."""

    @abstractmethod
    def rollback(self, n_accepted: torch.Tensor, active: torch.Tensor) -> None:
        """Keep pending and the first n_accepted[b] draft tokens of each active row; restore inactive rows."""


class ModelDraft(Drafter):
    """A draft model: a smaller model, or the target itself under another strategy (self-speculation).
    It may be a runner of another backend than the target's."""

    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self.cache: KVCache | None = None

    def start(self, tokens, positions, mask, capacity):
        batch = tokens.shape[0]
        self.cache = self.runner.new_cache(batch, capacity)
        if tokens.shape[1] > 1:
            self.runner.forward(self.cache, tokens[:, :-1], positions[:, :-1], mask[:, :-1])
        # a row whose last accepted draft token d_k was never run through the draft (all k accepted) "lags"
        self.lagging = torch.zeros(batch, dtype=torch.bool)
        self.lag_token = torch.zeros(batch, dtype=torch.long)

    def propose(self, history, pending, positions, k, sampling, generator):
        self.before = self.cache.lengths.clone().cpu()
        if bool(self.lagging.any()):  # feed [d_k, pending]; rows that do not lag get a padding slot instead
            feed = torch.stack([torch.where(self.lagging, self.lag_token, PAD_TOKEN), pending], dim=1)
            feed_positions = torch.stack([(positions - 1).clamp(min=0), positions], dim=1)
            feed_mask = torch.stack([self.lagging, torch.ones_like(self.lagging)], dim=1)
        else:
            feed, feed_positions, feed_mask = pending[:, None], positions[:, None], None
        tokens, probs = [], []
        for i in range(k):
            logits = self.runner.forward(self.cache, feed, feed_positions, feed_mask)[:, -1].cpu()
            q = distribution(logits, sampling)
            token = draw(q, torch.rand(len(pending), generator=generator, dtype=torch.float64))
            tokens.append(token)
            probs.append(q)
            feed, feed_positions, feed_mask = token[:, None], (positions + 1 + i)[:, None], None
        with single_threaded():  # (B, k, V) float64: see single_threaded
            self.drafted = torch.stack(tokens, dim=1)
            return self.drafted, torch.stack(probs, dim=1)

    def rollback(self, n_accepted, active):
        # the cache gained [lag or padding slot], pending, d_1..d_{k-1}; d_k was drafted but never run
        k = self.drafted.shape[1]
        unaccepted_run = (k - 1) - n_accepted.clamp(max=k - 1)
        self.cache.truncate(torch.where(active, self.cache.lengths.cpu() - unaccepted_run, self.before))
        all_accepted = active & (n_accepted == k)
        self.lagging = torch.where(active, all_accepted, self.lagging)
        self.lag_token = torch.where(all_accepted, self.drafted[:, -1], self.lag_token)


class PromptLookupDraft(Drafter):
    """Prompt lookup (n-gram) drafting, no model: find the latest earlier occurrence of the row's last n tokens
    (n from max_ngram down to 1) and propose what followed it (Saxena 2023, "Prompt Lookup Decoding";
    transformers' `prompt_lookup_num_tokens`). The proposal is deterministic, so q is one-hot."""

    def __init__(self, vocab_size: int, max_ngram: int = 3):
        if max_ngram < 1:
            raise ValueError(f"max_ngram must be at least 1, got {max_ngram}")
        self.vocab_size = vocab_size
        self.max_ngram = max_ngram

    def start(self, tokens, positions, mask, capacity):
        pass  # no state: every proposal is read from the history

    def continuation(self, history: list[int], k: int) -> list[int] | None:
        """The k tokens that followed the latest earlier match of the history's suffix, or None."""
        for n in range(min(self.max_ngram, len(history) - 1), 0, -1):
            suffix = history[-n:]
            for start in range(len(history) - n - 1, -1, -1):
                if history[start:start + n] == suffix:
                    # the match says the text repeats with period `shift`; continue that repetition for k tokens
                    shift = len(history) - n - start
                    extended = list(history)
                    for _ in range(k):
                        extended.append(extended[-shift])
                    return extended[len(history):]
        return None

    def propose(self, history, pending, positions, k, sampling, generator):
        found = [self.continuation(row, k) for row in history]
        if all(tokens is None for tokens in found):  # nothing to propose: a plain decoding step
            return torch.empty(len(history), 0, dtype=torch.long), torch.empty(len(history), 0, self.vocab_size,
                                                                              dtype=torch.float64)
        # a row without a match still needs k tokens: repeating its last token is as good a guess as any
        tokens = torch.tensor([row if row is not None else [h[-1]] * k for row, h in zip(found, history)])
        return tokens, one_hot(tokens, self.vocab_size)

    def rollback(self, n_accepted, active):
        pass


@dataclass
class SpeculativeStats:
    """Counts over the decode phase of active rows. Acceptance rate is Leviathan et al.'s alpha: the share of
    draft tokens the target judged (all accepted ones plus the first rejected) that it accepted."""

    target_calls: int = 0  # verification forwards (each covers every row of the batch)
    drafted: int = 0
    judged: int = 0
    accepted: int = 0
    emitted: int = 0
    full_rounds: int = 0  # row-rounds in which all k drafts were accepted (the bonus-token path)
    rejections: int = 0  # row-rounds with a rejection (the rollback path)
    draft_s: float = 0.0
    target_s: float = 0.0
    accepted_counts: list[int] = field(default_factory=list)  # per row-round

    def add_round(self, n_accepted: int, k: int) -> None:
        """One row's round: n_accepted of k drafts accepted, then one more token from the target."""
        self.accepted_counts.append(n_accepted)
        self.emitted += n_accepted + 1
        self.accepted += n_accepted
        self.judged += min(n_accepted + 1, k)
        self.drafted += k
        self.full_rounds += int(n_accepted == k and k > 0)
        self.rejections += int(n_accepted < k)

    @classmethod
    def total(cls, parts: list[SpeculativeStats]) -> SpeculativeStats:
        """The counts and times of several runs together (times add, per-round counts concatenate)."""
        merged = cls()
        for part in parts:
            for counter in fields(cls):
                setattr(merged, counter.name, getattr(merged, counter.name) + getattr(part, counter.name))
        return merged

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.judged if self.judged else float("nan")

    @property
    def tokens_per_target_call(self) -> float:
        """Tokens a row gains per verification (per target forward at batch size 1)."""
        return self.emitted / len(self.accepted_counts) if self.accepted_counts else float("nan")


@dataclass
class SpeculativeGeneration:
    tokens: list[list[int]]  # new tokens of each row
    logits: torch.Tensor  # (B, n_new, V) the target logits each new token was chosen from
    stats: SpeculativeStats


class SpeculativeDecoder:
    """Generates with `target`, drafting k tokens per round with `drafter`. Exact: the tokens are distributed as
    the target's own (greedy: identical to the target's), whatever the drafter proposes."""

    def __init__(self, target: ModelRunner, drafter: Drafter, k: int, sampling: Sampling = GREEDY):
        if k < 1:
            raise ValueError(f"k (draft tokens per round) must be at least 1, got {k}")
        self.target, self.drafter, self.k, self.sampling = target, drafter, k, sampling

    def generate(self, prompts: list[list[int]], max_new_tokens: int, seed: int = 0) -> SpeculativeGeneration:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("speculative decoding needs at least one prompt, each of at least one token")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be 0 or more, got {max_new_tokens}")
        generator = torch.Generator().manual_seed(seed)
        tokens, positions, mask = left_pad(prompts)
        batch, width = tokens.shape
        vocab = self.target.config.vocab_size
        # the draft cache may take a padding slot per round, and rounds <= max_new_tokens
        capacity = width + 2 * max_new_tokens + self.k + 2
        target_cache = self.target.new_cache(batch, capacity)
        if width > 1:
            self.target.forward(target_cache, tokens[:, :-1], positions[:, :-1], mask[:, :-1])
        self.drafter.start(tokens, positions, mask, capacity)

        history = [list(p) for p in prompts]
        out_tokens: list[list[int]] = [[] for _ in range(batch)]
        out_logits = torch.zeros(batch, max_new_tokens, vocab)
        pending, next_position = tokens[:, -1].clone(), positions[:, -1].clone()
        stats = SpeculativeStats()
        while any(len(row) < max_new_tokens for row in out_tokens):
            active = torch.tensor([len(row) < max_new_tokens for row in out_tokens])
            started = time.perf_counter()
            draft, q = self.drafter.propose(history, pending, next_position, self.k, self.sampling, generator)
            drafted = time.perf_counter()
            k = draft.shape[1]
            feed = torch.cat([pending[:, None], draft], dim=1)
            feed_positions = next_position[:, None] + torch.arange(k + 1)
            before = target_cache.lengths.clone().cpu()
            logits = self.target.forward(target_cache, feed, feed_positions).cpu()  # (B, k+1, V)
            p = distribution(logits, self.sampling)
            uniforms = torch.rand(batch, k + 1, generator=generator, dtype=torch.float64)
            n_accepted, next_token = verify(p, q, draft, uniforms[:, :k], uniforms[:, k])
            stats.draft_s += drafted - started
            stats.target_s += time.perf_counter() - drafted

            target_cache.truncate(torch.where(active, before + 1 + n_accepted, before))
            self.drafter.rollback(n_accepted, active)
            draft_rows, n_list, next_list = draft.tolist(), n_accepted.tolist(), next_token.tolist()
            for b in torch.nonzero(active).flatten().tolist():
                n = n_list[b]
                emitted = draft_rows[b][:n] + [next_list[b]]
                done, room = len(out_tokens[b]), max_new_tokens - len(out_tokens[b])
                out_logits[b, done:done + min(n + 1, room)] = logits[b, :min(n + 1, room)]
                out_tokens[b].extend(emitted[:room])
                history[b].extend(emitted)
                stats.add_round(n, k)
            stats.target_calls += 1
            pending = torch.where(active, next_token, pending)
            next_position = torch.where(active, next_position + 1 + n_accepted, next_position)
        return SpeculativeGeneration(out_tokens, out_logits, stats)
