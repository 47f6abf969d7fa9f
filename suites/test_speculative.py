"""Speculative decoding: exact by construction, shown to be exact, its speedup measured against the theory.

- greedy, on the --model checkpoint as the target: the tokens equal the target's own, for k = 1..8 and every
  draft source (always accepted: the target itself; never accepted: random weights; the trained draft; the
  target quantized; prompt lookup); the draft's cache holds exactly the accepted tokens;
- the rejection sampler alone, on synthetic distributions, judged by chi-square tests at significance 1e-4;
- end to end with sampling on a five-token vocabulary: the joint distribution of the generated tokens equals
  the target's, exactly enumerated (which needs a vocabulary of 5, so it runs on built-in tiny models, not on
  --model); plain sampling from the target is judged by the same test;
- bench: acceptance, tokens per target call, speedup over the target alone, beside Leviathan et al.'s prediction.
"""
from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable, Iterator
from functools import cache

import pytest
import torch

from backends.base import ModelRunner, UnsupportedModel
from backends.checkpoint import Checkpoint, ModelConfig
from backends.algorithms.generation import GREEDY, Generation, Sampling, generate
from backends.registry import get_backend
from backends.algorithms.rejection_sampler import draw, one_hot, residual, verify
from backends.algorithms.speculative import (Drafter, ModelDraft, PromptLookupDraft, SpeculativeDecoder,
                                            SpeculativeStats)
from backends.strategies import Quant, Strategy
from harness.models import parametrize_models, random_checkpoint, resolve_model
from harness.oracles import assert_distribution, assert_greedy_agrees
from harness.plugin import require
from harness.quality import repetition_loop

ROLLBACK = "cache-rollback"  # speculative decoding rolls each row back to its own accepted length
NATIVE = "speculative:native"  # an engine's own speculative decoding (backends/base.NativeSpeculativeRunner)
K_VALUES = [pytest.param(k, id=f"k{k}") for k in range(1, 9)]
GREEDY_TOKENS = 64
ALPHA = 1e-4  # significance of every chi-square test
SAMPLER_DRAWS = 60_000
SELF_DRAFT_QUANTS = (Quant.INT8_DYNAMIC, Quant.BF16)  # the target quantized, first one the backend declares
GREEDY_DRAFTS = ["target", "random", "trained", "self-quantized", "prompt-lookup"]
# test_draft_cache_follows_accepted_tokens needs a fully accepted round and a rejection: the (k, prompt seed)
# pairs it tries, in order, until one run has both
DRAFT_CACHE_TRIES = [(k, seed) for k in (3, 2, 1) for seed in (7, 8, 9, 10)]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    parametrize_models(metafunc, [])  # `model`: the --model checkpoint (the target), named in the test id


# --- draft sources -------------------------------------------------------------------------------


@cache
def random_draft_checkpoint(config: ModelConfig) -> Checkpoint:
    """Random weights, smaller than the target, same vocabulary: a draft the target (almost) never accepts."""
    small = config.replace(d_model=64, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=128, tie_embeddings=False,
                           head_dim_override=None)
    return random_checkpoint(small, seed=1234, name="random-draft")


_TRAINED_DRAFTS: dict[str, Checkpoint] = {}  # by target name; one object per session, so runners are cached


def trained_draft_checkpoint(target: Checkpoint) -> Checkpoint:
    """The distilled draft trained beside the target when there is one; otherwise a stand-in that agrees with
    the target often but not always: the target with noise added to every weight."""
    if target.name not in _TRAINED_DRAFTS:
        if target.name == "default-target":
            _TRAINED_DRAFTS[target.name] = resolve_model("default-draft")
        else:
            generator = torch.Generator().manual_seed(99)
            weights = {name: w + 0.1 * w.float().std() * torch.randn(w.shape, generator=generator)
                       for name, w in target.weights.items()}
            _TRAINED_DRAFTS[target.name] = Checkpoint(f"{target.name}-noisy", target.config, weights)
    return _TRAINED_DRAFTS[target.name]


def self_draft_strategy(backend) -> Strategy:
    for quant in SELF_DRAFT_QUANTS:
        if not backend.missing(f"quant:{quant.value}"):
            return Strategy(quant)
    pytest.skip(f"backend {backend.name} lacks capability {' or '.join(f'quant:{q.value}' for q in SELF_DRAFT_QUANTS)}")


def make_drafter(source: str, backend, checkpoint: Checkpoint, load_runner) -> Drafter:
    """The named draft source for this backend's target `checkpoint`."""
    if source == "target":
        return ModelDraft(load_runner(checkpoint, Strategy()))
    if source == "random":
        return ModelDraft(load_runner(random_draft_checkpoint(checkpoint.config), Strategy()))
    if source == "trained":
        return ModelDraft(load_runner(trained_draft_checkpoint(checkpoint), Strategy()))
    if source == "self-quantized":
        return ModelDraft(load_runner(checkpoint, self_draft_strategy(backend)))
    if source == "prompt-lookup":
        return PromptLookupDraft(checkpoint.config.vocab_size)
    raise ValueError(f"unknown draft source {source!r}; accepted: {', '.join(GREEDY_DRAFTS)}")


def record_draft(record, drafter: Drafter) -> None:
    """The draft model and strategy as record parameters (the record's own model is the target's)."""
    if isinstance(drafter, ModelDraft):
        record.params(draft_model=drafter.runner.checkpoint.name, draft_quant=drafter.runner.strategy.id)


def prompts_for(config: ModelConfig, seed: int = 7) -> list[list[int]]:
    """A ragged batch of seeded prompts (left padding, rows of different lengths)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(1, config.vocab_size, (n,), generator=generator).tolist() for n in (11, 4, 23)]


_TARGET_ALONE: dict[tuple, Generation] = {}


def target_alone(target: ModelRunner, prompts: list[list[int]], n: int) -> Generation:
    """The target's own greedy tokens (cached: runners live for the session)."""
    key = (id(target), tuple(map(tuple, prompts)), n)
    if key not in _TARGET_ALONE:
        _TARGET_ALONE[key] = generate(target, prompts, n)
    return _TARGET_ALONE[key]


# --- greedy: identical tokens --------------------------------------------------------------------


def assert_same_tokens(result, expected: Generation) -> None:
    for row, (tokens, reference) in enumerate(zip(result.tokens, expected.tokens)):
        assert len(tokens) == len(reference), f"row {row}: {len(tokens)} tokens, expected {len(reference)}"
        assert_greedy_agrees(tokens, result.logits[row], reference, expected.logits[row])


@pytest.mark.exactness
@pytest.mark.parametrize("k", K_VALUES)
@pytest.mark.parametrize("draft", GREEDY_DRAFTS)
def test_greedy_matches_target(backend, model, load_runner, record, draft, k):
    require(backend, ROLLBACK)
    checkpoint = model.checkpoint
    drafter = make_drafter(draft, backend, checkpoint, load_runner)
    target = load_runner(checkpoint, Strategy())  # loaded last: the record names the target's model and strategy
    record_draft(record, drafter)
    prompts = prompts_for(checkpoint.config)
    result = SpeculativeDecoder(target, drafter, k).generate(prompts, GREEDY_TOKENS)
    stats = result.stats
    record(acceptance_rate=stats.acceptance_rate, tokens_per_target_call=stats.tokens_per_target_call)
    assert_same_tokens(result, target_alone(target, prompts, GREEDY_TOKENS))
    # the paths this draft is meant to exercise were exercised
    if draft == "target":
        assert stats.full_rounds > 0, "the target as its own draft never had all k drafts accepted"
    if draft in ("random", "trained"):
        assert stats.rejections > 0, f"the {draft} draft was never rejected: the rollback path did not run"


class RecordingDraft(Drafter):
    """Wraps a drafter and keeps each round's (history, proposal) for inspection."""

    def __init__(self, inner: Drafter):
        self.inner = inner
        self.rounds: list[tuple[list[list[int]], list[list[int]]]] = []

    def start(self, tokens, positions, mask, capacity):
        self.inner.start(tokens, positions, mask, capacity)

    def propose(self, history, pending, positions, k, sampling, generator):
        tokens, probs = self.inner.propose(history, pending, positions, k, sampling, generator)
        self.rounds.append(([list(h) for h in history], tokens.tolist()))
        return tokens, probs

    def rollback(self, n_accepted, active):
        self.inner.rollback(n_accepted, active)


@pytest.mark.exactness
def test_draft_cache_follows_accepted_tokens(backend, model, load_runner, record):
    """After every rollback the draft model proposes exactly its own greedy continuation of the accepted history:
    its cache holds the accepted tokens and nothing else (a stale draft cache would not change the output, only
    the acceptance, so the greedy test alone cannot see it). The check needs a run with a fully accepted round
    and a rejection: the first (k, prompts) of DRAFT_CACHE_TRIES that gives both is used."""
    require(backend, ROLLBACK)
    draft_runner = load_runner(trained_draft_checkpoint(model.checkpoint), Strategy())
    target = load_runner(model.checkpoint, Strategy())
    full_rounds = rejections = 0
    for tries, (k, seed) in enumerate(DRAFT_CACHE_TRIES, start=1):
        drafter = RecordingDraft(ModelDraft(draft_runner))
        stats = SpeculativeDecoder(target, drafter, k).generate(prompts_for(model.checkpoint.config, seed), 32).stats
        if stats.full_rounds > 0 and stats.rejections > 0:
            break
        full_rounds, rejections = full_rounds + stats.full_rounds, rejections + stats.rejections
    else:
        pytest.skip(f"draft {draft_runner.checkpoint.name}: no run had both a fully accepted round and a rejection "
                    f"({len(DRAFT_CACHE_TRIES)} runs, k = 3, 2, 1, 4 prompt sets each: {full_rounds} full rounds, "
                    f"{rejections} rejections in all), so there is no rollback to check")
    record.params(k=k, prompt_seed=seed)
    checked = 0
    for history, proposal in drafter.rounds[:12]:
        alone = generate(draft_runner, history, k)
        for row, tokens in enumerate(proposal):
            assert tokens == alone.tokens[row], (f"round {checked // len(proposal)}, row {row}: the draft proposed "
                                                 f"{tokens}, its own greedy continuation is {alone.tokens[row]}")
            checked += 1
    record(proposals_checked=checked, tries=tries)


_CROSS_RUNNERS: dict[tuple, ModelRunner] = {}


def cross_runner(backend_name: str, checkpoint: Checkpoint) -> ModelRunner:
    """A runner of a backend other than the test's own (fp32, the backend's default attention), kept for the module."""
    try:
        backend = get_backend(backend_name)()
    except ValueError as error:
        pytest.skip(f"backend {backend_name} is not available: {error}")
    key = (backend_name, checkpoint.name)
    if key not in _CROSS_RUNNERS:
        try:
            _CROSS_RUNNERS[key] = backend.load(checkpoint, Strategy())
        except UnsupportedModel as error:
            pytest.skip(f"backend {backend_name}: {error}")
    return _CROSS_RUNNERS[key]


@pytest.mark.exactness
@pytest.mark.parametrize("k", [pytest.param(k, id=f"k{k}") for k in (1, 4, 8)])
def test_greedy_torch_draft_onnxrt_target(model, record, k):
    """Draft and target on different backends: a torch draft, an ONNX Runtime target."""
    checkpoint = model.checkpoint
    target = cross_runner("onnxrt", checkpoint)
    drafter = ModelDraft(cross_runner("torch", trained_draft_checkpoint(checkpoint)))
    record.params(draft_backend="torch", target_backend="onnxrt")
    prompts = prompts_for(checkpoint.config)
    result = SpeculativeDecoder(target, drafter, k).generate(prompts, GREEDY_TOKENS)
    record(acceptance_rate=result.stats.acceptance_rate, tokens_per_target_call=result.stats.tokens_per_target_call)
    assert_same_tokens(result, target_alone(target, prompts, GREEDY_TOKENS))
    assert result.stats.rejections > 0 and result.stats.accepted > 0, "need both accepted and rejected drafts"


# --- the sampler alone, on synthetic distributions -----------------------------------------------

V, K = 8, 3


def synthetic(seed: int, n: int) -> torch.Tensor:
    """n distributions over V tokens, no probability below about 2%."""
    generator = torch.Generator().manual_seed(seed)
    weights = torch.rand(n, V, generator=generator, dtype=torch.float64) + 0.2
    return weights / weights.sum(-1, keepdim=True)


def synthetic_pair() -> tuple[torch.Tensor, torch.Tensor]:
    """p_1..p_{K+1} and q_1..q_K. Token 7 has target probability 0 (the draft proposes it), token 0 draft
    probability 0 (only the residual or the bonus can emit it)."""
    p, q = synthetic(1, K + 1), synthetic(2, K)
    p[:, 7] = 0
    q[:, 0] = 0
    return p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)


def normalized_residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)), written out here so the tests do not judge the sampler by its own code."""
    excess = (p - q).clamp(min=0)
    return excess / excess.sum(-1, keepdim=True)


def run_sampler(p: torch.Tensor, q: torch.Tensor, n: int, seed: int):
    """n independent rows: draft from q (torch.multinomial), verify against p.
    Returns (n_accepted (n,), tokens (n, K+1), emitted (n, K+1)): the token at each output position, and
    whether the row reached that position."""
    generator = torch.Generator().manual_seed(seed)
    drafts = torch.stack([torch.multinomial(q[j], n, replacement=True, generator=generator) for j in range(K)], dim=1)
    uniforms = torch.rand(n, K + 1, generator=generator, dtype=torch.float64)
    n_accepted, next_token = verify(p.expand(n, -1, -1), q.expand(n, -1, -1), drafts, uniforms[:, :K], uniforms[:, K])
    # the token at output position j: the draft while j < n_accepted, then the drawn one
    positions = torch.arange(K + 1)
    tokens = torch.where(positions < n_accepted[:, None], torch.cat([drafts, drafts[:, :1]], 1), next_token[:, None])
    emitted = positions <= n_accepted[:, None]
    return n_accepted, tokens, emitted


@pytest.fixture(scope="module")
def sampler_run():
    p, q = synthetic_pair()
    return p, q, run_sampler(p, q, SAMPLER_DRAWS, seed=0)


@pytest.mark.exactness
def test_sampler_tokens_follow_target(sampler_run, record):
    """The token at each output position, over the rows that reach it, is distributed as the target's p_j
    (the acceptances before it are independent of the draws at j); never a token of probability 0."""
    p, q, (n_accepted, tokens, emitted) = sampler_run
    pvalues = []
    for j in range(K + 1):
        counts = torch.bincount(tokens[emitted[:, j], j], minlength=V)
        pvalues.append(assert_distribution(counts, p[j], ALPHA, what=f"token at position {j}"))
    record(draws=SAMPLER_DRAWS, min_pvalue=min(pvalues))


@pytest.mark.exactness
def test_sampler_accepted_counts(sampler_run, record):
    """P(n accepted) = [1 - a0, a0 (1 - a1), a0 a1 (1 - a2), a0 a1 a2] with a_i = sum(min(p_i, q_i))."""
    p, q, (n_accepted, _, _) = sampler_run
    a = torch.minimum(p[:K], q).sum(-1)
    reached = torch.cat([torch.ones(1, dtype=torch.float64), a.cumprod(0)])  # P(n >= j)
    expected = reached - torch.cat([reached[1:], torch.zeros(1, dtype=torch.float64)])
    pvalue = assert_distribution(torch.bincount(n_accepted, minlength=K + 1), expected, ALPHA, what="accepted counts")
    record(draws=SAMPLER_DRAWS, min_pvalue=pvalue)


@pytest.mark.exactness
def test_sampler_token_after_rejection_is_residual(sampler_run, record):
    """The token drawn after a rejection at position j follows norm(max(0, p_j - q_j))."""
    p, q, (n_accepted, tokens, _) = sampler_run
    pvalues = []
    for j in range(K):
        rejected_here = n_accepted == j
        counts = torch.bincount(tokens[rejected_here, j], minlength=V)
        pvalues.append(assert_distribution(counts, normalized_residual(p[j], q[j]), ALPHA,
                                           what=f"token after rejection at {j}"))
    record(draws=SAMPLER_DRAWS, min_pvalue=min(pvalues))


@pytest.mark.exactness
def test_sampler_p_equals_q(record):
    """p == q: every draft is accepted (no NaN from the empty residual) and the bonus token follows p_{K+1}."""
    p, _ = synthetic_pair()
    n_accepted, tokens, _ = run_sampler(p, p[:K].clone(), SAMPLER_DRAWS, seed=1)
    assert bool((n_accepted == K).all()), f"{int((n_accepted < K).sum())} of {SAMPLER_DRAWS} rows rejected a draft"
    assert torch.isfinite(residual(p[:K], p[:K])).all()
    pvalue = assert_distribution(torch.bincount(tokens[:, K], minlength=V), p[K], ALPHA, what="bonus token")
    record(draws=SAMPLER_DRAWS, min_pvalue=pvalue)


@pytest.mark.exactness
def test_sampler_never_accepts_zero_probability_tokens():
    """A deterministic draft (q one-hot) of a token the target gives probability 0 is always rejected."""
    p, _ = synthetic_pair()
    n = 10_000
    drafts = torch.full((n, K), 7)  # p(7) == 0 at every position
    uniforms = torch.rand(n, K + 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    n_accepted, next_token = verify(p.expand(n, -1, -1), one_hot(drafts, V), drafts, uniforms[:, :K], uniforms[:, K])
    assert bool((n_accepted == 0).all()), "a draft token of target probability 0 was accepted"
    assert not bool((next_token == 7).any()), "a token of target probability 0 was drawn after the rejection"


@pytest.mark.exactness
def test_sampler_uniform_draw_of_zero():
    """u == 0 exactly: accept only tokens the target can emit, and draw no token of probability 0."""
    p = torch.tensor([[[0.0, 0.5, 0.5, 0.0], [0.0, 0.0, 1.0, 0.0]]], dtype=torch.float64)  # (1, K=1 + 1, 4)
    q = torch.full((1, 1, 4), 0.25, dtype=torch.float64)
    zero = torch.zeros(1, 1, dtype=torch.float64)
    n_accepted, next_token = verify(p, q, torch.tensor([[0]]), zero, zero[:, 0])  # draft token 0: p = 0
    assert n_accepted.tolist() == [0], "u = 0 accepted a draft token of target probability 0"
    assert next_token.tolist() == [1], f"u = 0 drew token {next_token.item()}; the residual's first possible token is 1"
    n_accepted, next_token = verify(p, q, torch.tensor([[2]]), zero, zero[:, 0])  # p(2) = 0.5 > 0: accepted
    assert n_accepted.tolist() == [1] and next_token.tolist() == [2], (n_accepted, next_token)
    assert draw(p[0, :1], torch.zeros(1)).tolist() == [1], "u = 0 drew a token of probability 0"


# --- end to end, sampling, on a five-token vocabulary --------------------------------------------

TINY_VOCAB = ModelConfig(vocab_size=5, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32,
                         max_position_embeddings=64)
E2E_PROMPT = [1, 3, 2]
E2E_NEW, E2E_K, E2E_DRAWS = 4, 2, 50_000
# (draft, sampling, draws): temperature 1 with each draft; then temperatures below and above 1 with top-k and top-p
# set, where a draft that samples untempered, or a filter applied in another order or one token short, shows
# (20,000 draws catch each such fault of tests/faults/escapes.py, and keep the cases cheap)
SAMPLING_CASES = [
    pytest.param("random-model", Sampling(temperature=1.0), E2E_DRAWS, id="random-model"),
    pytest.param("prompt-lookup", Sampling(temperature=1.0), E2E_DRAWS, id="prompt-lookup"),
    pytest.param("random-model", Sampling(temperature=0.7, top_k=4, top_p=0.8), 20_000, id="random-model-t0.7-k4-p0.8"),
    pytest.param("random-model", Sampling(temperature=1.5, top_k=3, top_p=0.7), 20_000, id="random-model-t1.5-k3-p0.7"),
]
TOP_P_MARGIN = 1e-5  # a top-p boundary this close to a cumulative mass could fall either way in fp32 (ill-posed)


@cache
def tiny_vocab_checkpoint(seed: int) -> Checkpoint:
    return random_checkpoint(TINY_VOCAB, seed=seed, name=f"tiny-vocab-s{seed}")


def sampled_distribution(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """(N, V) float64 logits -> the probabilities the documented rule draws from, written here so the test does
    not judge the sampler by its own code: divide by the temperature, keep the top_k largest, then keep the most
    likely tokens until their renormalized mass reaches top_p (a token is kept while the mass before it is below
    top_p), and renormalize."""
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    ordered, order = probs.sort(dim=-1, descending=True)
    rank = torch.arange(probs.shape[-1])
    kept = ordered * (rank < sampling.top_k if sampling.top_k > 0 else True)
    kept = kept / kept.sum(-1, keepdim=True)
    mass_before = kept.cumsum(-1) - kept
    if sampling.top_p < 1.0:
        margin = (mass_before - sampling.top_p).abs()[kept > 0].min().item()
        assert margin > TOP_P_MARGIN, f"sampling: top-p {sampling.top_p} lies {margin:.2g} from a cumulative mass"
        kept = kept * (mass_before < sampling.top_p)
    kept = kept / kept.sum(-1, keepdim=True)
    return torch.zeros_like(probs).scatter(-1, order, kept)


def exact_sequence_probabilities(target: ModelRunner, prompt: list[int], n: int, sampling: Sampling) -> torch.Tensor:
    """(V^n,) the probability of every continuation of n tokens sampled from the target, in lexicographic order."""
    vocab = target.config.vocab_size
    sequences = torch.tensor(list(itertools.product(range(vocab), repeat=n)))
    tokens = torch.cat([torch.tensor(prompt).expand(len(sequences), -1), sequences], dim=1)
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    logits = target.forward_full(tokens, positions).double().cpu()[:, len(prompt) - 1:-1]  # (N, n, V)
    probs = sampled_distribution(logits.flatten(0, 1), sampling).view_as(logits)
    return probs.gather(-1, sequences[..., None]).squeeze(-1).prod(-1)


def sequence_counts(rows: list[list[int]], vocab: int, n: int) -> torch.Tensor:
    index = torch.tensor(rows) @ (vocab ** torch.arange(n - 1, -1, -1))
    return torch.bincount(index, minlength=vocab ** n)


def sampling_label(sampling: Sampling) -> str:
    return f"temperature {sampling.temperature}, top-k {sampling.top_k}, top-p {sampling.top_p}"


@pytest.mark.exactness
@pytest.mark.parametrize(("draft", "sampling", "draws"), SAMPLING_CASES)
def test_sampling_matches_target_distribution(backend, load_runner, record, draft, sampling, draws):
    """Speculative sampling (k=2, 4 new tokens, every row accepting on its own) and plain sampling from the target
    both follow the exact joint distribution of the 5^4 continuations under the sampling setting. Drafts: another
    random model (q a full distribution), and prompt lookup (q one-hot, and rounds with nothing to propose)."""
    require(backend, ROLLBACK)
    drafter = ModelDraft(load_runner(tiny_vocab_checkpoint(1), Strategy())) if draft == "random-model" \
        else PromptLookupDraft(TINY_VOCAB.vocab_size)
    target = load_runner(tiny_vocab_checkpoint(0), Strategy())
    exact = exact_sequence_probabilities(target, E2E_PROMPT, E2E_NEW, sampling)
    prompts = [E2E_PROMPT] * draws
    speculative = SpeculativeDecoder(target, drafter, E2E_K, sampling).generate(prompts, E2E_NEW, seed=0)
    plain = generate(target, prompts, E2E_NEW, sampling, seed=0)
    vocab, label = TINY_VOCAB.vocab_size, sampling_label(sampling)
    record.params(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
    pvalue_spec = assert_distribution(sequence_counts(speculative.tokens, vocab, E2E_NEW), exact, ALPHA,
                                      what=f"sampling: speculative, {label}")
    pvalue_plain = assert_distribution(sequence_counts(plain.tokens, vocab, E2E_NEW), exact, ALPHA,
                                       what=f"sampling: plain, {label}")
    stats = speculative.stats
    assert stats.rejections > 0 and stats.full_rounds > 0, \
        f"sampling: {label}: the run needs both rejections and full acceptance to exercise both paths"
    record(draws=draws, min_pvalue=min(pvalue_spec, pvalue_plain), pvalue_speculative=pvalue_spec,
           pvalue_plain=pvalue_plain, acceptance_rate=stats.acceptance_rate)


# --- bench: speedup over the target alone, beside the theory -------------------------------------

BENCH_DRAFTS = ["trained", "self-quantized", "prompt-lookup"]
BENCH_K_VALUES = (1, 2, 3, 4, 5, 7)
BENCH_PROMPTS, BENCH_PROMPT_TOKENS, BENCH_TOKENS = 4, 64, 64  # short prompts: prefill (in both timings) stays small
BENCH_ROUNDS = 3  # timed rounds of every prompt, after one warm-up round
HELDOUT_MIN_CHARS = 4000  # a held-out document long enough that its middle is code or prose, not a header
BENCH_SAMPLING = Sampling(temperature=0.7)
MODE_K = 4  # sampling, and batch 4 (the BENCH_PROMPTS prompts in one batch), beside greedy batch 1 at this k
BENCH_CASES = (
    [pytest.param(draft, k, 1, GREEDY, id=f"{draft}-k{k}") for draft in BENCH_DRAFTS for k in BENCH_K_VALUES]
    + [pytest.param(draft, MODE_K, 1, BENCH_SAMPLING, id=f"{draft}-k{MODE_K}-t{BENCH_SAMPLING.temperature}")
       for draft in BENCH_DRAFTS]
    + [pytest.param(draft, MODE_K, BENCH_PROMPTS, GREEDY, id=f"{draft}-k{MODE_K}-batch{BENCH_PROMPTS}")
       for draft in BENCH_DRAFTS])
# at MODE_K only: transformers' assisted generation is slow to time (its main-job minutes)
NATIVE_CASES = [pytest.param(draft, MODE_K, id=f"{draft}-k{MODE_K}") for draft in ("trained", "prompt-lookup")]


def prompt_candidates(checkpoint: Checkpoint) -> Iterator[list[int]]:
    """BENCH_PROMPT_TOKENS tokens from the middle of each held-out document (text the embedded models never saw),
    in corpus order and the model's own tokenizer; character tables (encodings/) are left out, as they repeat by
    construction. Seeded random tokens for a model without a tokenizer."""
    if checkpoint.directory is not None and (checkpoint.directory / "tokenizer.json").exists():
        from harness import corpus
        from harness.training import load_tokenizer

        tokenizer = load_tokenizer(checkpoint.directory)
        _, heldout = corpus.split(corpus.documents())
        for doc in heldout:
            if len(doc.text) >= HELDOUT_MIN_CHARS and "/encodings/" not in doc.name:
                ids = tokenizer.encode(doc.text).ids
                yield ids[len(ids) // 2:len(ids) // 2 + BENCH_PROMPT_TOKENS]
    for seed in itertools.count(11):
        generator = torch.Generator().manual_seed(seed)
        yield torch.randint(1, checkpoint.config.vocab_size, (BENCH_PROMPT_TOKENS,), generator=generator).tolist()


_BENCH_PROMPTS: dict[str, tuple[list[list[int]], int]] = {}  # by target name: every backend gets the same prompts


def bench_prompts(target: ModelRunner) -> tuple[list[list[int]], int]:
    """The first BENCH_PROMPTS candidates whose greedy continuation by the target does not loop
    (harness.quality.repetition_loop: a loop flatters every draft, prompt lookup most), and how many looping
    candidates were passed over."""
    name = target.checkpoint.name
    if name not in _BENCH_PROMPTS:
        chosen, passed_over = [], 0
        for prompt in prompt_candidates(target.checkpoint):
            if len(chosen) == BENCH_PROMPTS:
                break
            if repetition_loop(generate(target, [prompt], BENCH_TOKENS).tokens[0]):
                passed_over += 1
            else:
                chosen.append(prompt)
        _BENCH_PROMPTS[name] = chosen, passed_over
    return _BENCH_PROMPTS[name]


def predicted_speedup(acceptance: float, k: int, c: float, verify_cost: float = 1.0) -> float:
    """Leviathan, Kalman & Matias (2023), "Fast Inference from Transformers via Speculative Decoding", Theorem 3.8:
    expected walltime improvement (1 - a^(k+1)) / ((1 - a)(c k + 1)), the expected tokens per round
    (1 - a^(k+1)) / (1 - a) (their eq. 1) over the round's cost in target steps. The theorem takes a verification
    forward of k+1 tokens to cost one target step; `verify_cost` replaces that 1 with the measured cost."""
    tokens_per_round = k + 1 if acceptance >= 1.0 else (1 - acceptance ** (k + 1)) / (1 - acceptance)
    return tokens_per_round / (c * k + verify_cost)


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def time_alternately(benchmark, baseline: Callable, candidate: Callable, groups: list) -> tuple[list, list, list, list]:
    """Run baseline(group) then candidate(group) over every group, round after round (one warm-up round, then
    BENCH_ROUNDS timed). Returns each side's per-round seconds (all groups; warm-up dropped) and last outputs."""
    times: dict[str, list[float]] = {"baseline": [], "candidate": []}
    outputs: dict[str, list] = {}

    def run_all(side: str, run: Callable) -> None:
        outputs[side] = []
        start = time.perf_counter()
        for group in groups:
            outputs[side].append(run(group))
        times[side].append(time.perf_counter() - start)

    benchmark.pedantic(lambda: run_all("candidate", candidate), setup=lambda: run_all("baseline", baseline),
                       rounds=BENCH_ROUNDS, warmup_rounds=1)
    warm = slice(1, None)  # setup also runs before the warm-up round
    return times["baseline"][warm], times["candidate"][warm], outputs["baseline"], outputs["candidate"]


@pytest.mark.bench
@pytest.mark.parametrize(("draft", "k", "batch", "sampling"), BENCH_CASES)
def test_speedup(backend, model, load_runner, record, benchmark, draft, k, batch, sampling):
    """The speculative decoder and the target alone, timed alternately in the same run on the same held-out
    prompts, one at a time (batch 1) or all in one batch; greedy, or sampling with a fixed seed.
    c: the draft's time per drafted token (one draft forward of the batch) over the target's time per step alone;
    verify cost v: one verification forward (k+1 tokens, plus the sampler) in the same unit."""
    require(backend, ROLLBACK)
    checkpoint = model.checkpoint
    drafter = make_drafter(draft, backend, checkpoint, load_runner)
    target = load_runner(checkpoint, Strategy())
    record_draft(record, drafter)
    decoder = SpeculativeDecoder(target, drafter, k, sampling)
    prompts, passed_over = bench_prompts(target)
    groups = [[prompt] for prompt in prompts] if batch == 1 else [prompts]
    target_times, speculative_times, alone, results = time_alternately(
        benchmark, lambda group: generate(target, group, BENCH_TOKENS, sampling, seed=0),
        lambda group: decoder.generate(group, BENCH_TOKENS, seed=0), groups)
    if sampling == GREEDY:
        assert [r.tokens for r in results] == [a.tokens for a in alone], "speculative greedy tokens differ from the target's"
    outputs = [row for generation in alone + results for row in generation.tokens]
    target_s, speculative_s = median(target_times), median(speculative_times)
    stats = SpeculativeStats.total([result.stats for result in results])
    target_step = target_s / (BENCH_TOKENS * len(groups))
    c = stats.draft_s / (stats.target_calls * k) / target_step
    verify_cost = stats.target_s / stats.target_calls / target_step
    acceptance = stats.acceptance_rate if stats.judged else 0.0
    predicted = predicted_speedup(acceptance, k, c)
    speedup = target_s / speculative_s
    record.params(draft=draft, k=k, batch=batch, temperature=sampling.temperature, prompts=len(prompts),
                  new_tokens=BENCH_TOKENS, prompt_tokens=BENCH_PROMPT_TOKENS, prompts_passed_over=passed_over,
                  threads=torch.get_num_threads())
    if batch == 1:  # each prompt ran alone: its own acceptance
        by_prompt = [result.stats.acceptance_rate for result in results if result.stats.judged]
        record(acceptance_median=median(by_prompt), acceptance_min=min(by_prompt), acceptance_max=max(by_prompt))
        record.samples(acceptance_by_prompt=by_prompt)
    record(acceptance_rate=acceptance, tokens_per_target_call=stats.tokens_per_target_call,
           tokens_per_s=BENCH_TOKENS * len(prompts) / speculative_s,
           target_tokens_per_s=BENCH_TOKENS * len(prompts) / target_s, speedup=speedup, c=c, verify_cost=verify_cost,
           predicted_speedup=predicted, measured_over_predicted=speedup / predicted,
           predicted_with_verify_cost=predicted_speedup(acceptance, k, c, verify_cost),
           looping_outputs=sum(repetition_loop(tokens) for tokens in outputs))
    # per-round speedups of the interleaved pairs: the spread the regression gate tests a change against
    record.samples(speedup=[t / s for t, s in zip(target_times, speculative_times)])


@pytest.mark.bench
@pytest.mark.parametrize(("draft", "k"), NATIVE_CASES)
def test_native_speedup(backend, model, load_runner, record, benchmark, draft, k):
    """An engine's own speculative decoding (transformers' assisted generation with the trained draft converted,
    or its prompt lookup), greedy batch 1 on test_speedup's prompts, timed alternately against the same
    engine's plain generate: the figures to set beside test_speedup's."""
    require(backend, NATIVE)
    checkpoint = model.checkpoint
    draft_runner = load_runner(trained_draft_checkpoint(checkpoint), Strategy()) if draft == "trained" else None
    target = load_runner(checkpoint, Strategy())
    if draft_runner is not None:
        record.params(draft_model=draft_runner.checkpoint.name, draft_quant=draft_runner.strategy.id)
    prompts, passed_over = bench_prompts(target)
    plain_times, native_times, plain, native = time_alternately(
        benchmark, lambda group: target.generate_native(group[0], BENCH_TOKENS),
        lambda group: target.generate_native(group[0], BENCH_TOKENS, k, draft_runner), [[p] for p in prompts])
    assert native == plain, f"{backend.name}'s own speculative greedy tokens differ from its plain generate's"
    record.params(draft=draft, k=k, batch=1, temperature=0.0, prompts=len(prompts), new_tokens=BENCH_TOKENS,
                  prompt_tokens=BENCH_PROMPT_TOKENS, prompts_passed_over=passed_over, threads=torch.get_num_threads())
    plain_s, native_s = median(plain_times), median(native_times)
    record(speedup=plain_s / native_s, tokens_per_s=BENCH_TOKENS * len(prompts) / native_s,
           target_tokens_per_s=BENCH_TOKENS * len(prompts) / plain_s,
           looping_outputs=sum(repetition_loop(tokens) for tokens in plain + native))
    record.samples(speedup=[p / n for p, n in zip(plain_times, native_times)])
