"""The rejection sampler of speculative decoding, as pure tensor functions.

Leviathan, Kalman & Matias (2023), "Fast Inference from Transformers via Speculative Decoding", Algorithm 1,
and Chen et al. (2023), "Accelerating Large Language Model Decoding with Speculative Sampling", Algorithm 2:
the draft proposes x_1..x_k from q_1..q_k; the target's p_1..p_{k+1} come from one forward pass. Draft token
x_i is accepted with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection the next token is drawn
from norm(max(0, p_i - q_i)); when all k are accepted a bonus token is drawn from p_{k+1}. Every emitted
token is then distributed exactly as the target alone would have drawn it.

Greedy decoding is the same scheme with one-hot distributions (argmax of the target, the draft's token), so
there is one code path. Every random draw is an explicit uniform in [0, 1) the caller passes in: the tests
inject draws of exactly 0, and the decoder draws them from one seeded generator.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager

import torch

from .generation import Sampling, filter_logits


@contextmanager
def single_threaded():
    """torch ops on one thread inside the block. The sampler's tensors are a few rows of the vocabulary, which one
    thread does in microseconds; torch splits an op of more than 32,768 elements over its thread pool, and a parallel
    region waits for every thread to get a core: beside onnxruntime's workers (which spin after each run) or any
    other load on 2 cores, that is a scheduler tick, ~15 ms per op, several per round (onnxrt's verification cost
    5 target steps at batch 1 and 12 at batch 4)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def on_one_thread(function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with single_threaded():
            return function(*args, **kwargs)
    return wrapper


@on_one_thread
def distribution(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """(..., V) logits -> (..., V) float64 probabilities the sampling setting draws from (one-hot when greedy)."""
    flat = logits.reshape(-1, logits.shape[-1])
    if sampling.temperature == 0:
        probs = torch.nn.functional.one_hot(flat.argmax(dim=-1), flat.shape[-1]).double()
    else:
        probs = torch.softmax(filter_logits(flat, sampling).double(), dim=-1)
    return probs.reshape(logits.shape)


@on_one_thread
def one_hot(tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(...) tokens -> (..., V) float64: the distribution of a deterministic proposal."""
    return torch.nn.functional.one_hot(tokens, vocab_size).double()


@on_one_thread
def draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: (..., V) probabilities summing to 1 and (...) uniforms in [0, 1) -> (...) tokens.

    The first token whose cumulative probability exceeds u, so a token of probability 0 is never chosen
    (not even by u == 0); rounding at the top of the CDF falls back to the last token of positive probability.
    """
    cdf = probs.cumsum(dim=-1)
    index = torch.searchsorted(cdf, uniforms.to(cdf.dtype)[..., None].contiguous(), right=True).squeeze(-1)
    last_positive = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(dim=-1)
    return torch.minimum(index, last_positive)


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)) over the last axis. Where p <= q everywhere (p == q) the residual has no mass, but
    then every draft token is accepted and the residual is never drawn from; p stands in to keep it finite."""
    excess = (p - q).clamp(min=0)
    mass = excess.sum(dim=-1, keepdim=True)
    return torch.where(mass > 0, excess / mass.clamp(min=torch.finfo(mass.dtype).tiny), p)


@on_one_thread
def verify(p: torch.Tensor, q: torch.Tensor, draft: torch.Tensor, accept_uniforms: torch.Tensor,
           draw_uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Judge k draft tokens per row.

    p: (B, k+1, V) target probabilities, q: (B, k, V) draft probabilities, draft: (B, k) the proposed tokens,
    accept_uniforms: (B, k), draw_uniforms: (B,). Returns (n_accepted (B,), next_token (B,)); row b emits
    draft[b, :n_accepted[b]] followed by next_token[b].
    """
    batch, k = draft.shape
    if p.shape[:2] != (batch, k + 1) or q.shape[:2] != (batch, k):
        raise ValueError(f"verify needs p (B, k+1, V) and q (B, k, V) for draft (B, k) = {tuple(draft.shape)}; "
                         f"got p {tuple(p.shape)}, q {tuple(q.shape)}")
    p_draft = p[:, :k].gather(-1, draft[..., None]).squeeze(-1)
    q_draft = q.gather(-1, draft[..., None]).squeeze(-1)
    # u < p/q, written without the division: a token the target gives probability 0 is never accepted, even at u == 0
    accepted = accept_uniforms * q_draft < p_draft
    n_accepted = accepted.long().cumprod(dim=-1).sum(dim=-1)
    # the distribution of the token after the accepted ones: the residual at the rejection, or p_{k+1} (bonus)
    choices = torch.cat([residual(p[:, :k], q), p[:, k:]], dim=1)  # (B, k+1, V)
    # gather, not choices[arange, n_accepted]: advanced indexing opens a parallel region even on a few elements
    chosen = choices.gather(1, n_accepted[:, None, None].expand(-1, 1, choices.shape[-1])).squeeze(1)
    return n_accepted, draw(chosen, draw_uniforms)
