"""Generation over the adapter contract: left-padded batches, cached decode, greedy or seeded sampling."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from backends.base import ModelRunner

PAD_TOKEN = 0


@dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy; top_k 0 and top_p 1 disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0


GREEDY = Sampling()


def left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """tokens, positions and mask (B, T) for left-padded prompts; positions count real tokens only."""
    width = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), width), PAD_TOKEN, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        if prompt:
            tokens[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = True
    positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
    return tokens, positions, mask


def filter_logits(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """(B, V) logits -> (B, V) scaled logits with the tokens outside top-k / top-p set to -inf."""
    logits = logits.float() / sampling.temperature
    if sampling.top_k > 0:
        kth = torch.topk(logits, min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        ordered, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = torch.softmax(ordered, dim=-1).cumsum(dim=-1)
        drop = cumulative - torch.softmax(ordered, dim=-1) >= sampling.top_p  # keep the smallest set reaching top_p
        logits = logits.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
    return logits


def next_tokens(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) logits -> (B,) tokens."""
    if sampling.temperature == 0:
        if logits.device.type == "cpu" and logits.dtype == torch.float32:
            # numpy's argmax (the first maximum, as torch's) took 4 us where torch's took 11 at batch 1, 60 at 8
            return torch.from_numpy(logits.detach().numpy().argmax(-1))
        return logits.argmax(dim=-1)
    probs = torch.softmax(filter_logits(logits, sampling), dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


@dataclass
class Generation:
    tokens: list[list[int]]  # new tokens of each row
    logits: torch.Tensor  # (B, n_new, V) the logits each new token was chosen from


def generate(runner: ModelRunner, prompts: list[list[int]], max_new_tokens: int,
             sampling: Sampling = GREEDY, seed: int = 0, use_cache: bool = True) -> Generation:
    """Generate `max_new_tokens` per row. use_cache=False recomputes the whole sequence every step (the oracle)."""
    generator = torch.Generator().manual_seed(seed)
    tokens, positions, mask = left_pad(prompts)
    cache = runner.new_cache(len(prompts), tokens.shape[1] + max_new_tokens) if use_cache else None
    step_logits = []
    new_tokens, new_positions, new_mask = tokens, positions, mask
    for _ in range(max_new_tokens):
        if cache is not None:
            logits = runner.forward(cache, new_tokens, new_positions, new_mask)[:, -1]
        else:
            logits = runner.forward_full(tokens, positions, mask)[:, -1]
        step_logits.append(logits.cpu())
        chosen = next_tokens(logits, sampling, generator).cpu()
        new_tokens = chosen[:, None]
        new_positions = positions[:, -1:] + 1
        new_mask = torch.ones_like(new_tokens, dtype=torch.bool)
        tokens = torch.cat([tokens, new_tokens], dim=1)
        positions = torch.cat([positions, new_positions], dim=1)
        mask = torch.cat([mask, new_mask], dim=1)
    generated = tokens[:, -max_new_tokens:] if max_new_tokens else tokens[:, :0]
    return Generation(generated.tolist(), torch.stack(step_logits, dim=1) if step_logits else torch.empty(0))
