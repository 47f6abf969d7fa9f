"""Step runners: each turns a scheduled step into model calls and samples each request's next token.

They compute and never decide: which sequences run, with how many tokens and in which memory, comes from the
scheduler and the block manager (copies of shared blocks too). Each sequence (each sample of each request) samples
with its own generator, seeded by its request and sample, so its draws are the same whatever batch it runs in.
"""
from __future__ import annotations

import torch

from backends.base import ModelRunner, PackedStepRunner, PagedRunner
from backends.algorithms.generation import left_pad, next_tokens

from .block_manager import BlockManager, RowPool
from .scheduler import Chunk, Sequence, StepPlan


class Sampler:
    """Per-sequence generators; the logits each token was chosen from, per sequence."""

    def __init__(self):
        self.generators: dict[tuple[int, int], torch.Generator] = {}
        self.logits: dict[tuple[int, int], list[torch.Tensor]] = {}

    def __call__(self, seq: Sequence, logits: torch.Tensor) -> int:
        """(V,) logits -> the sequence's next token."""
        if seq.id not in self.generators:
            self.generators[seq.id] = torch.Generator().manual_seed(seq.seed)
            self.logits[seq.id] = []
        self.logits[seq.id].append(logits.cpu())
        return int(next_tokens(logits[None], seq.request.sampling, self.generators[seq.id])[0])


def packed_inputs(chunks: list[Chunk]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Tokens and positions (N,) of every chunk, one after another, and the index of each chunk's last token."""
    tokens = [t for c in chunks for t in c.seq.tokens[c.start: c.start + c.count]]
    positions = [p for c in chunks for p in range(c.start, c.start + c.count)]
    last = torch.tensor([c.count for c in chunks]).cumsum(0) - 1
    return torch.tensor(tokens), torch.tensor(positions), last.tolist()


def sample_chunks(sampler: Sampler, chunks: list[Chunk], logits: torch.Tensor,
                  last: list[int]) -> dict[tuple[int, int], int]:
    return {seq.id: sampler(seq, logits[index]) for c, index in zip(chunks, last) for seq in c.samplers}


class ContiguousStepRunner:
    """`continuous`: one packed call per step over a contiguous cache of one row per running sequence."""

    def __init__(self, model: PackedStepRunner | ModelRunner, rows: RowPool, n_rows: int, max_seq_len: int):
        self.model, self.rows = model, rows
        self.cache = model.new_cache(n_rows, max_seq_len)
        self.sampler = Sampler()

    def run(self, plan: StepPlan) -> dict[tuple[int, int], int]:
        chunks = plan.chunks
        if plan.admitted:  # a row taken over by a new sequence starts empty
            self.cache.reset(torch.tensor([self.rows.rows[seq.id] for seq in plan.admitted]))
        tokens, positions, last = packed_inputs(chunks)
        rows = torch.tensor([self.rows.rows[c.seq.id] for c in chunks for _ in range(c.count)])
        logits = self.model.forward_packed(self.cache, tokens, positions, rows)
        return sample_chunks(self.sampler, chunks, logits, last)

    def reserved_tokens(self, running) -> int:
        return len(running) * self.cache.capacity  # each running sequence holds a whole row


class PagedStepRunner:
    """`paged`, `paged-prefix`: one packed call per step over the block pool, through the block tables."""

    def __init__(self, model: PagedRunner, blocks: BlockManager, cache):
        self.model, self.blocks, self.cache = model, blocks, cache
        self.sampler = Sampler()

    def run(self, plan: StepPlan) -> dict[tuple[int, int], int]:
        chunks = plan.chunks
        if plan.copies:  # copy-on-write: a sample's private copy of a block its group shared
            source, target = zip(*plan.copies)
            self.cache.copy_blocks(torch.tensor(source), torch.tensor(target))
        tokens, positions, last = packed_inputs(chunks)
        tables = [self.blocks.tables[c.seq.id] for c in chunks]
        width = max(len(t) for t in tables)
        block_tables = torch.tensor([t + [-1] * (width - len(t)) for t in tables])
        seqs = torch.tensor([i for i, c in enumerate(chunks) for _ in range(c.count)])
        context_lens = torch.tensor([c.start + c.count for c in chunks])
        logits = self.model.forward_paged(self.cache, tokens, positions, seqs, block_tables, context_lens)
        return sample_chunks(self.sampler, chunks, logits, last)

    def reserved_tokens(self, running) -> int:
        return sum(len(self.blocks.tables[seq.id]) for seq in running) * self.blocks.block_size


class StaticBatchRunner:
    """`static`, `sequential`: a left-padded batch through the core contract, every row stepping until the
    longest request is done (a finished row keeps computing; its tokens are dropped)."""

    def __init__(self, model: ModelRunner):
        self.model = model
        self.sampler = Sampler()

    def start(self, batch: list[Sequence]) -> list[int]:
        tokens, positions, mask = left_pad([list(s.request.prompt) for s in batch])
        longest = max(s.request.max_new_tokens for s in batch)
        self.batch, self.positions = batch, positions[:, -1:]
        self.cache = self.model.new_cache(len(batch), tokens.shape[1] + longest - 1)
        logits = self.model.forward(self.cache, tokens, positions, mask)[:, -1]
        return self.choose(logits, steps_done=0)

    def step(self, chosen: list[int], steps_done: int) -> list[int]:
        self.positions = self.positions + 1
        logits = self.model.forward(self.cache, torch.tensor(chosen)[:, None], self.positions)[:, -1]
        return self.choose(logits, steps_done)

    def choose(self, logits: torch.Tensor, steps_done: int) -> list[int]:
        """Each row's next token; rows whose request is done get the argmax, which nobody keeps."""
        return [self.sampler(s, logits[i]) if steps_done < s.request.max_new_tokens else int(logits[i].argmax())
                for i, s in enumerate(self.batch)]
