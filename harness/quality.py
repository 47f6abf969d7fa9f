"""Quality on held-out text, with llama.cpp's definitions (tools/perplexity).

The held-out documents (harness.corpus) are tokenized into one stream and cut into consecutive windows of
`n_ctx` tokens; each window is run from an empty context and only its second half is scored, so every
scored token sees at least n_ctx/2 tokens of context (llama.cpp's `perplexity` does the same). Figures come
with their standard errors: PPL = exp(mean NLL) +- PPL * std(NLL)/sqrt(n); an agreement rate p +- sqrt(p(1-p)/n).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from backends.base import ModelRunner

from . import corpus


def evaluation_windows(tokenizer, n_ctx: int) -> torch.Tensor:
    """(N, n_ctx) token ids: the held-out stream (each document ended by EOS) in consecutive windows."""
    _, heldout = corpus.split(corpus.documents())
    eos = tokenizer.token_to_id(corpus.EOS)
    ids: list[int] = []
    for encoding in tokenizer.encode_batch([doc.text for doc in heldout]):
        ids.extend(encoding.ids + [eos])
    usable = len(ids) // n_ctx * n_ctx
    return torch.tensor(ids[:usable]).view(-1, n_ctx)


@dataclass
class NextTokenStats:
    """Per scored position: the negative log-likelihood of the true next token and the model's top-1 token."""

    nll: torch.Tensor  # (n,) float64
    top1: torch.Tensor  # (n,) int64


def next_token_stats(runner: ModelRunner, windows: torch.Tensor, batch_size: int = 8) -> NextTokenStats:
    """Run each window through the full-sequence path and score the second half of its positions."""
    n_ctx = windows.shape[1]
    first = n_ctx // 2  # logits at position i predict token i + 1: score predictions of tokens n_ctx/2 .. n_ctx-1
    nll, top1 = [], []
    for start in range(0, len(windows), batch_size):
        tokens = windows[start : start + batch_size]
        positions = torch.arange(n_ctx).expand_as(tokens)
        logits = runner.forward_full(tokens, positions)[:, first - 1 : -1].double()  # (B, n_ctx/2, V)
        targets = tokens[:, first:]
        nll.append(-logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0].flatten())
        top1.append(logits.argmax(-1).flatten())
    return NextTokenStats(torch.cat(nll), torch.cat(top1))


@dataclass(frozen=True)
class Estimate:
    value: float
    error: float  # one standard error


def perplexity(stats: NextTokenStats) -> Estimate:
    mean = stats.nll.mean().item()
    error = stats.nll.std().item() / math.sqrt(len(stats.nll))
    return Estimate(math.exp(mean), math.exp(mean) * error)


def same_top1(a: NextTokenStats, b: NextTokenStats) -> Estimate:
    """The fraction of positions where both models' top-1 tokens agree (it bounds greedy speculative acceptance)."""
    if a.top1.shape != b.top1.shape:
        raise ValueError(f"the models were scored on different positions: {tuple(a.top1.shape)} vs {tuple(b.top1.shape)}")
    p = (a.top1 == b.top1).double().mean().item()
    return Estimate(p, math.sqrt(p * (1 - p) / len(a.top1)))
