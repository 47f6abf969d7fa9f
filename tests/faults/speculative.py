"""Speculative decoding and sampling faults: one function of the decoder or the rejection sampler swapped for a
faulty copy, or a cache whose rollback is off by one; suites/test_speculative.py with tiny-random as the target
(the outcomes below are for that target, whatever the default model is)."""
from __future__ import annotations

import torch

from backends.algorithms import rejection_sampler, speculative
from backends.torch_ref.backend import TorchRunner

from . import Fault
from .kv_cache import planted

SUITE = "suites/test_speculative.py"
MODEL = ("--model", "tiny-random")
TEMPERATURE_1 = "sampling_matches_target and not (t0.7 or t1.5)"  # the end-to-end cases at temperature 1
SAMPLER_SELECTION = f"sampler or ({TEMPERATURE_1})"
GREEDY_SELECTION = "greedy_matches_target and (random-k1 or trained-k1)"  # ids: [torch-<model>-<draft>-k1]
GREEDY_DIFFERS = "FAILED *test_speculative.py::test_greedy_matches_target* - AssertionError: greedy tokens differ*"


def argmax_draft(monkeypatch):
    """The draft proposes its argmax while the sampler is told the token was drawn from q."""
    monkeypatch.setattr(speculative, "draw", lambda probs, uniforms: probs.argmax(dim=-1))


def residual_not_renormalized(monkeypatch):
    """After a rejection the next token is drawn from max(0, p - q) without dividing by its mass."""
    monkeypatch.setattr(rejection_sampler, "residual", lambda p, q: (p - q).clamp(min=0))


def draft_rollback_keeps_a_rejected_token(monkeypatch):
    """The draft's rollback is off by one: it keeps the first rejected draft token. The output is still exact (the
    target decides), so only the check of the draft's proposals can see it."""
    rollback = speculative.ModelDraft.rollback

    def rollback_off_by_one(self, n_accepted, active):
        cache = self.cache
        truncate = cache.truncate
        cache.truncate = lambda lengths: truncate(torch.minimum(lengths + 1, cache.lengths.cpu()))
        try:
            rollback(self, n_accepted, active)
        finally:
            del cache.truncate

    monkeypatch.setattr(speculative.ModelDraft, "rollback", rollback_off_by_one)


def accepts_past_a_rejection(monkeypatch):
    """Verification counts every accepted draft token, also those after the first rejection (a sum where the
    accepted prefix is meant)."""
    def verify(p, q, draft, accept_uniforms, draw_uniforms):
        batch, k = draft.shape
        p_draft = p[:, :k].gather(-1, draft[..., None]).squeeze(-1)
        q_draft = q.gather(-1, draft[..., None]).squeeze(-1)
        n_accepted = (accept_uniforms * q_draft < p_draft).long().sum(dim=-1)  # the fault: not .cumprod(-1).sum(-1)
        choices = torch.cat([rejection_sampler.residual(p[:, :k], q), p[:, k:]], dim=1)
        return n_accepted, rejection_sampler.draw(choices[torch.arange(batch), n_accepted], draw_uniforms)

    monkeypatch.setattr(speculative, "verify", verify)


class TargetRollbackOffByOneRunner(TorchRunner):
    """truncate() keeps one token more than asked: after a rejection the target's cache keeps the first rejected
    draft token."""

    def new_cache(self, batch_size, capacity):
        cache = super().new_cache(batch_size, capacity)
        truncate = cache.truncate
        cache.truncate = lambda lengths: truncate(torch.minimum(lengths + 1, cache.lengths.cpu()))
        return cache


FAULTS = [
    Fault("argmax-draft", "sampling", argmax_draft.__doc__, SUITE, TEMPERATURE_1,
          "FAILED *test_sampling_matches_target_distribution*random-model* - *sampling: speculative, temperature 1.0*"
          "chi-square * p = * < 0.0001*", patch=argmax_draft, args=MODEL,
          outcomes={"failed": 1, "passed": 1}),  # prompt lookup's proposals are deterministic: not affected
    Fault("residual-not-renormalized", "sampling", residual_not_renormalized.__doc__, SUITE, SAMPLER_SELECTION,
          "FAILED *test_speculative.py::test_sampler_token_after_rejection_is_residual* - *chi-square*",
          patch=residual_not_renormalized, args=MODEL, outcomes={"failed": 4, "passed": 4}),
    Fault("draft-rollback-off-by-one", "speculative", draft_rollback_keeps_a_rejected_token.__doc__, SUITE,
          f"draft_cache_follows or ({GREEDY_SELECTION})", "*the draft proposed * its own greedy continuation is*",
          patch=draft_rollback_keeps_a_rejected_token, args=MODEL, outcomes={"failed": 1, "passed": 2}),
    Fault("accepts-past-a-rejection", "speculative", accepts_past_a_rejection.__doc__, SUITE,
          "greedy_matches_target and random-k4", GREEDY_DIFFERS, patch=accepts_past_a_rejection, args=MODEL),
    Fault("target-rollback-off-by-one", "speculative", TargetRollbackOffByOneRunner.__doc__, SUITE, GREEDY_SELECTION,
          GREEDY_DIFFERS, backend=planted("target-rollback-off-by-one", TargetRollbackOffByOneRunner), args=MODEL,
          outcomes={"failed": 2}),
]
