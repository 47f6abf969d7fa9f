"""The speculative-decoding suite is trusted only because it fails on these planted faults.

Each test plants one fault (a planted-fault backend, or one function of the decoder swapped for a faulty
copy), runs a selection of suites/test_speculative.py in process, and asserts which tests fail and why.
"""
from pathlib import Path

import torch

from backends.algorithms import rejection_sampler, speculative

from .planted_faults import PLANTED

SUITE = str(Path(__file__).resolve().parents[1] / "suites" / "test_speculative.py")
TEMPERATURE_1 = "sampling_matches_target and not (t0.7 or t1.5)"  # the end-to-end cases at temperature 1
SAMPLER_SELECTION = f"sampler or ({TEMPERATURE_1})"
GREEDY_SELECTION = "greedy_matches_target and (random-k1 or trained-k1)"  # ids: [torch-<model>-<draft>-k1]
MODEL = "tiny-random"  # the outcomes asserted below are for this target, whatever the default model is


def run_suite(pytester, selection: str, backend: str = "torch", model: str = MODEL):
    return pytester.runpytest_inprocess(SUITE, "-m", "exactness", "--backend", backend, "--model", model,
                                        "-k", selection, "-p", "no:randomly", "-q")


def test_reference_passes_the_same_selections(pytester):
    result = run_suite(pytester, f"{SAMPLER_SELECTION} or ({GREEDY_SELECTION}) or draft_cache_follows")
    result.assert_outcomes(passed=11)


def test_argmax_draft_is_caught(pytester, monkeypatch):
    """The draft proposes its argmax while the sampler is told the token was drawn from q."""
    monkeypatch.setattr(speculative, "draw", lambda probs, uniforms: probs.argmax(dim=-1))
    result = run_suite(pytester, TEMPERATURE_1)
    result.assert_outcomes(failed=1, passed=1)  # prompt lookup's proposals are deterministic: not affected
    result.stdout.fnmatch_lines(["*sampling: speculative, temperature 1.0*: chi-square * p = * < 0.0001*",
                                 "FAILED *test_sampling_matches_target_distribution*random-model*"])


def test_residual_not_renormalized_is_caught(pytester, monkeypatch):
    """After a rejection the next token is drawn from max(0, p - q) without dividing by its mass."""
    monkeypatch.setattr(rejection_sampler, "residual", lambda p, q: (p - q).clamp(min=0))
    result = run_suite(pytester, SAMPLER_SELECTION)
    result.assert_outcomes(failed=4, passed=4)
    result.stdout.fnmatch_lines_random(["FAILED *test_sampler_tokens_follow_target*",
                                        "FAILED *test_sampler_token_after_rejection_is_residual*",
                                        "FAILED *test_sampling_matches_target_distribution*random-model*",
                                        "FAILED *test_sampling_matches_target_distribution*prompt-lookup*"])


def test_target_cache_not_rolled_back_is_caught(pytester, register_backend):
    """truncate() does nothing: rejected draft tokens stay in the target's (and the draft's) cache."""
    result = run_suite(pytester, GREEDY_SELECTION, backend=register_backend(PLANTED["no-rollback"]))
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(["*greedy tokens differ at step*"])


def test_draft_cache_keeping_a_rejected_token_is_caught(pytester, monkeypatch):
    """The draft's rollback is off by one: it keeps the first rejected draft token. The output is still exact
    (the target decides), so only the check of the draft's proposals can see it."""
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
    result = run_suite(pytester, f"draft_cache_follows or ({GREEDY_SELECTION})")
    result.assert_outcomes(failed=1, passed=2)
    result.stdout.fnmatch_lines(["*the draft proposed * its own greedy continuation is*"])
