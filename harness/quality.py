"""Quality on held-out text, with llama.cpp's definitions (tools/perplexity).

The held-out documents (harness.corpus) are tokenized into one stream and cut into consecutive windows of
`n_ctx` tokens; each window is run from an empty context and only its second half is scored, so every
scored token sees at least n_ctx/2 tokens of context (llama.cpp's `perplexity` does the same). Figures come
with their standard errors: PPL = exp(mean NLL) +- PPL * std(NLL)/sqrt(n); an agreement rate p +- sqrt(p(1-p)/n).
"""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
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


@dataclass(frozen=True)
class Divergence:
    """A quantized model against its fp32 base on the same positions (llama.cpp's `--kl-divergence` figures)."""

    ppl: Estimate
    base_ppl: Estimate
    delta_ppl: Estimate  # PPL(Q) - PPL(base), its error from the covariance of the two NLLs
    mean_kld: Estimate
    kld_p99: float
    kld_max: float
    rms_delta_p: Estimate  # root mean square change in the probability of the true next token
    same_top1: Estimate


def divergence(base_logprobs: torch.Tensor, logprobs: torch.Tensor, targets: torch.Tensor) -> Divergence:
    """(n, V) log-probabilities of the base and the quantized model at the same n scored positions, (n,) targets."""
    if base_logprobs.shape != logprobs.shape:
        raise ValueError(f"base and quantized log-probabilities differ in shape: {tuple(base_logprobs.shape)} "
                         f"vs {tuple(logprobs.shape)}")
    base_logprobs, logprobs = base_logprobs.double(), logprobs.double()
    n = len(targets)
    kld = (base_logprobs.exp() * (base_logprobs - logprobs)).sum(-1)  # KL(base || quantized) per position
    nll_base = -base_logprobs.gather(-1, targets[:, None])[:, 0]
    nll = -logprobs.gather(-1, targets[:, None])[:, 0]
    base_ppl = perplexity(NextTokenStats(nll_base, base_logprobs.argmax(-1)))
    ppl = perplexity(NextTokenStats(nll, logprobs.argmax(-1)))
    covariance = torch.cov(torch.stack([nll, nll_base]))[0, 1].item()
    delta_var = (ppl.error**2 + base_ppl.error**2
                 - 2 * ppl.value * base_ppl.value * covariance / n)  # delta method, as llama.cpp
    delta_p = nll_base.neg().exp() - nll.neg().exp()
    rms = delta_p.pow(2).mean().sqrt().item()
    rms_error = delta_p.pow(2).std().item() / math.sqrt(n) / (2 * rms) if rms > 0 else 0.0
    agreement = (base_logprobs.argmax(-1) == logprobs.argmax(-1)).double().mean().item()
    return Divergence(
        ppl=ppl, base_ppl=base_ppl,
        delta_ppl=Estimate(ppl.value - base_ppl.value, math.sqrt(max(delta_var, 0.0))),
        mean_kld=Estimate(kld.mean().item(), kld.std().item() / math.sqrt(n)),
        kld_p99=torch.quantile(kld, 0.99).item(), kld_max=kld.max().item(),
        rms_delta_p=Estimate(rms, rms_error),
        same_top1=Estimate(agreement, math.sqrt(agreement * (1 - agreement) / n)),
    )


def scored_logprobs(runner: ModelRunner, windows: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """(N * n_ctx/2, V) float32 log-probabilities at the scored positions of each window (as next_token_stats)."""
    n_ctx = windows.shape[1]
    first = n_ctx // 2
    pieces = []
    for start in range(0, len(windows), batch_size):
        tokens = windows[start : start + batch_size]
        positions = torch.arange(n_ctx).expand_as(tokens)
        logits = runner.forward_full(tokens, positions)[:, first - 1 : -1].double()
        pieces.append(logits.log_softmax(-1).float().flatten(0, 1))
    return torch.cat(pieces)


def scored_targets(windows: torch.Tensor) -> torch.Tensor:
    return windows[:, windows.shape[1] // 2 :].flatten()


def base_logprobs(path: Path, windows: torch.Tensor, compute) -> torch.Tensor:
    """The fp32 base's scored log-probabilities, stored once (llama-perplexity's --kl-divergence-base): read from
    `path` (numpy .npz, never unpickled) when it holds these exact windows, else `compute(windows)` and stored.
    Written to a temporary name and renamed in one step, so an interrupted run leaves nothing a later one trusts."""
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as stored:
                if np.array_equal(stored["windows"], windows.numpy()):
                    return torch.from_numpy(stored["logprobs"])
        except (OSError, ValueError, KeyError):
            pass  # unreadable or of another layout: recomputed and replaced below
    logprobs = compute(windows)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".tmp-", suffix=".npz", delete=False) as handle:
        np.savez_compressed(handle, windows=windows.numpy(), logprobs=logprobs.numpy())
    os.replace(handle.name, path)
    return logprobs


LOOP_MAX_PERIOD = 16  # tokens in the repeated block
LOOP_SHARE = 0.5  # of the output


def repetition_loop(tokens: list[int], max_period: int = LOOP_MAX_PERIOD, share: float = LOOP_SHARE) -> bool:
    """A generated output that loops: a block of at most `max_period` tokens repeated back to back over at least
    `share` of the output (tokens[i] == tokens[i - p] for every i of a stretch that, with its first block, covers
    that share). Such output inflates every draft's acceptance, prompt lookup's most."""
    for period in range(1, max_period + 1):
        run = 0
        for i in range(period, len(tokens)):
            run = run + 1 if tokens[i] == tokens[i - period] else 0
            if run + period >= share * len(tokens):
                return True
    return False
