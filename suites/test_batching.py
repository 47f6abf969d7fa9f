"""Batching: every request's output equals the same request run alone, whatever strategy serves it.

The reference for each request is `backends.algorithms.generation.generate` on that request alone (a batch of one, the
plain cached decode the KV-cache suite checks). Every strategy the backend declares (`--batching`) serves the
same requests and must give, per request, the same greedy tokens and logits within `logit_bound`:

- workloads of seeded random arrivals, batch limits 1..16, prompts of 1..200 tokens and outputs of 1..200;
  a request arriving while another is in prefill; a prompt longer than the step's token budget (chunked
  prefill); preemption under a small block pool. Each workload asserts it exercised what it is for.
- paged: the paged step equals the contiguous one on random permuted block tables, lengths not divisible by
  the block size, with every pool slot NaN until written, so any stray read shows;
- prefix cache: cached-token counts are multiples of the block size; outputs equal the uncached run; a prompt
  whose blocks are all cached still computes its last token; another model sharing the pool never hits
  (the salt); after the last request, every block is free or held only by the prefix cache (leaks), by the
  block manager's own accounting;
- sampling: with a seed per request, the sampled tokens are those of the request alone;
- parallel sampling: each of a request's samples (its own seed, derived from the request's) equals that seed's run
  alone; greedy samples are identical; under the paged strategies the samples share the prompt's blocks, the last
  partial one copied on a sample's first write (counted exactly), fewer blocks are held than unshared samples
  would take, nothing leaks, and a preempted group is recomputed.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, replace
from functools import cache

import pytest
import torch

from backends.checkpoint import Checkpoint
from backends.algorithms.generation import Generation, Sampling, generate
from backends.algorithms.serving import Request, ServingConfig, serve
from backends.algorithms.serving.engine import WallClock, paged_memory
from backends.algorithms.serving.request import DEFAULT_BLOCK_SIZE, sample_seed
from backends.strategies import Batching, Strategy
from harness.latency import serving_metrics, slo_label
from harness.models import SMALL, random_checkpoint, small_checkpoint
from harness.plugin import require
from harness.workloads import PROFILES, make_requests, system_prompt

BLOCK_SIZE = 16
PAGED = (Batching.PAGED, Batching.PAGED_PREFIX)


def logit_bound(logits: torch.Tensor) -> float:
    """fp32 rounding of logits computed in another batch shape: 1e-5 relative to their magnitude (absolute
    1e-5 for logits of magnitude <= 1). Batched matmuls sum in another order, so exact equality is not due."""
    return 1e-5 * max(1.0, float(logits.abs().max()))


@dataclass(frozen=True)
class Workload:
    """Requests (by their lengths and arrival steps) and the serving parameters they are run under."""

    lengths: tuple[tuple[int, int, int], ...]  # (prompt tokens, new tokens, arrival step) per request
    max_batch: int
    step_tokens: int
    paged_kv_tokens: int  # the block pool of paged strategies (a small one forces preemption)
    seed: int

    def requests(self, vocab: int, sampling: Sampling = Sampling()) -> list[Request]:
        generator = torch.Generator().manual_seed(self.seed)
        return [Request(i, tuple(torch.randint(1, vocab, (n,), generator=generator).tolist()), m, arrival,
                        sampling, seed=1000 + i) for i, (n, m, arrival) in enumerate(self.lengths)]

    def config(self, batching: Batching, max_len: int) -> ServingConfig:
        kv_tokens = self.paged_kv_tokens if batching in PAGED else self.max_batch * max_len
        return ServingConfig(batching, max_batch=self.max_batch, step_tokens=self.step_tokens, kv_tokens=kv_tokens,
                             block_size=BLOCK_SIZE, block_order_seed=self.seed, pool_fill=float("nan"))


def random_lengths(seed: int, n: int, prompt: int, output: int, window: int) -> tuple[tuple[int, int, int], ...]:
    generator = torch.Generator().manual_seed(seed)
    draw = lambda high: int(torch.randint(1, high + 1, (1,), generator=generator))  # noqa: E731
    return tuple((draw(prompt), draw(output), draw(window) - 1) for _ in range(n))


WORKLOADS = {
    # random arrival steps and lengths; more requests than may run at once, so rows and blocks are reused
    "random-arrivals": Workload(random_lengths(1, 10, 120, 32, 24), max_batch=3, step_tokens=64,
                                paged_kv_tokens=2048, seed=1),
    # all at once, up to 16 running together
    "burst-16": Workload(random_lengths(2, 16, 60, 12, 1), max_batch=16, step_tokens=256, paged_kv_tokens=4096,
                         seed=2),
    # a 200-token prompt (over the 48-token step budget: chunked) in prefill when a short one arrives
    "arrives-during-prefill": Workload(((200, 8, 0), (5, 24, 1), (30, 16, 6)), max_batch=4, step_tokens=48,
                                       paged_kv_tokens=2048, seed=3),
    # a 200-token output (most of the model's 256 positions) beside shorter requests that join and retire under it
    "long-output": Workload(((6, 200, 0), (50, 24, 3), (24, 40, 10)), max_batch=3, step_tokens=64,
                            paged_kv_tokens=1024, seed=5),
    # a pool of 12 blocks for requests of up to 8 blocks each: paged strategies must preempt and recompute
    "small-pool": Workload(((90, 40, 0), (70, 48, 0), (100, 20, 1), (40, 30, 2)), max_batch=4, step_tokens=128,
                           paged_kv_tokens=12 * BLOCK_SIZE, seed=4),
}

_ALONE: dict[tuple, Generation] = {}


def alone(runner, request: Request, sample: int = 0) -> Generation:
    """The request's sample run by itself with its seed (cached per runner: runners live for the session)."""
    seed = sample_seed(request.seed, sample)
    key = (id(runner), request.prompt, request.max_new_tokens, request.sampling, seed)
    if key not in _ALONE:
        _ALONE[key] = generate(runner, [list(request.prompt)], request.max_new_tokens, request.sampling, seed=seed)
    return _ALONE[key]


def assert_each_as_alone(runner, result) -> float:
    """Every completion's tokens equal its request's alone, and its logits within logit_bound; the worst error."""
    worst = 0.0
    for completion in result.completions:
        request, reference = completion.request, alone(runner, completion.request, completion.sample)
        who = f"request {request.id}"
        if request.samples > 1:
            who += (f" sample {completion.sample} of {request.samples} (parallel samples: the prompt's blocks shared, "
                    "copy-on-write)")
        assert completion.tokens == reference.tokens[0], (
            f"{who} ({len(request.prompt)}-token prompt): tokens {completion.tokens} differ from "
            f"its tokens alone {reference.tokens[0]}")
        error = float((completion.logits - reference.logits[0]).abs().max())
        bound = logit_bound(reference.logits[0])
        assert error <= bound, f"{who}: logits differ from alone by {error:.3g} > {bound:.3g}"
        worst = max(worst, error)
    return worst


def load(backend, load_runner, checkpoint: Checkpoint, batching: Batching):
    require(backend, f"batching:{batching.value}")
    return load_runner(checkpoint, Strategy())


def max_len(checkpoint: Checkpoint) -> int:
    return checkpoint.config.max_position_embeddings


def assert_no_leak(result) -> None:
    books = result.stats.block_accounting  # accounting() itself raises when the books do not balance
    assert books["held"] == 0, f"{books['held']} blocks still held after every request finished: {books}"


@pytest.mark.exactness
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_each_request_as_alone(backend, load_runner, checkpoint, batching, workload, record):
    runner = load(backend, load_runner, checkpoint, batching)
    spec = WORKLOADS[workload]
    requests = spec.requests(checkpoint.config.vocab_size)
    result = serve(runner, requests, spec.config(batching, max_len(checkpoint)))
    record(max_abs_logit_error=assert_each_as_alone(runner, result), steps=result.stats.steps,
           preemptions=result.stats.preemptions, mixed_steps=result.stats.mixed_steps)
    iterative = batching not in (Batching.SEQUENTIAL, Batching.STATIC)
    if batching is not Batching.SEQUENTIAL:
        assert result.stats.max_running > 1, "no two requests ever ran together"
    if iterative and workload == "arrives-during-prefill":
        first = result.completions[0]
        assert first.request.arrival < result.completions[1].request.arrival < first.first_token_time, \
            "the second request did not arrive during the first one's prefill"
        assert result.stats.chunked_prompts >= 1 and result.stats.mixed_steps >= 1, result.stats
    if batching in PAGED:
        assert_no_leak(result)
        if workload == "small-pool":
            assert result.stats.preemptions > 0, "the small pool never forced a preemption"
            if batching is Batching.PAGED_PREFIX:
                assert result.stats.block_accounting["evictions"] > 0, "no cached block was ever evicted"


@pytest.mark.exactness
def test_paged_step_matches_contiguous(backend, load_runner, checkpoint, record):
    """Three sequences of 37, 5 and 21 tokens, prefilled in two chunks and decoded three tokens, through random
    permuted block tables in a NaN-filled pool, against the contiguous cache."""
    runner = load(backend, load_runner, checkpoint, Batching.PAGED)
    generator = torch.Generator().manual_seed(11)
    lengths = [37, 5, 21]
    tokens = [torch.randint(1, checkpoint.config.vocab_size, (n + 3,), generator=generator) for n in lengths]
    n_blocks = 16
    pool = runner.new_paged_cache(n_blocks, BLOCK_SIZE, fill=float("nan"))
    order = torch.randperm(n_blocks, generator=generator).tolist()
    tables = []
    for n in lengths:
        need = -(-(n + 3) // BLOCK_SIZE)
        tables.append(order[:need] + [-1] * (4 - need))
        order = order[need:]
    block_tables = torch.tensor(tables)
    contiguous = runner.new_cache(len(lengths), max(lengths) + 3)
    done = [0, 0, 0]
    worst = 0.0
    for step in ([20, 5, 10], [17, 0, 11], [1, 1, 1], [1, 1, 1], [1, 1, 1]):
        seqs = torch.tensor([s for s, count in enumerate(step) for _ in range(count)])
        picked = [torch.arange(done[s], done[s] + count) for s, count in enumerate(step)]
        positions = torch.cat(picked)
        step_tokens = torch.cat([tokens[s][p] for s, p in enumerate(picked)])
        context_lens = torch.tensor([done[s] + count for s, count in enumerate(step)])
        paged = runner.forward_paged(pool, step_tokens, positions, seqs, block_tables, context_lens)
        expected = runner.forward_packed(contiguous, step_tokens, positions, seqs)
        assert torch.isfinite(paged).all(), "a NaN slot of the pool was read"
        error = float((paged - expected).abs().max())
        assert error <= logit_bound(expected), f"paged logits differ from contiguous by {error:.3g}"
        worst = max(worst, error)
        done = context_lens.tolist()
    record(max_abs_logit_error=worst)


# position encodings whose keys carry their own positions into the packed and paged steps (ALiBi, a sliding window)
# or whose positions enter only at the embedding; the --model checkpoint covers RoPE
POSITION_CASES = {"alibi": ("alibi", "gqa"), "learned": ("learned", "gqa"), "sinusoidal": ("sinusoidal", "mqa"),
                  "rope-window-12": None}


@cache
def position_case(name: str) -> Checkpoint:
    if POSITION_CASES[name] is not None:
        return small_checkpoint(*POSITION_CASES[name])
    config = SMALL.replace(n_kv_heads=2, sliding_window=12, sliding_layers=(0,))  # one sliding layer, one global
    return random_checkpoint(config, name="small-rope-window-12")


@pytest.mark.exactness
@pytest.mark.config_matrix
@pytest.mark.parametrize("position", list(POSITION_CASES))
@pytest.mark.parametrize("iterative", [Batching.CONTINUOUS, Batching.PAGED], ids=lambda b: b.value)
def test_position_encodings_served_as_alone(backend, load_runner, iterative, position, record):
    """The small models of the configuration matrix whose attention reads key positions (ALiBi's bias, a sliding
    window) or whose positions are embedded: each request as alone under the packed and the paged step."""
    require(backend, f"batching:{iterative.value}")
    checkpoint = position_case(position)
    runner = load_runner(checkpoint, Strategy())
    spec = WORKLOADS["random-arrivals"]
    result = serve(runner, spec.requests(checkpoint.config.vocab_size)[:6], spec.config(iterative, max_len(checkpoint)))
    record(max_abs_logit_error=assert_each_as_alone(runner, result))
    assert result.stats.max_running > 1 and result.stats.mixed_steps > 0, result.stats


SHARED = 48  # a shared system prompt of three full blocks


def prefix_requests(vocab: int) -> list[Request]:
    """Requests sharing a 48-token prefix, with tails of odd lengths; one repeating a prompt exactly; one
    whose first block is another's second block (its hash must differ: its parent differs)."""
    generator = torch.Generator().manual_seed(5)
    draw = lambda n: tuple(torch.randint(1, vocab, (n,), generator=generator).tolist())  # noqa: E731
    shared, tails = draw(SHARED), [draw(n) for n in (7, 20, 33)]
    prompts = [shared + tail for tail in tails] + [shared + tails[0], shared[BLOCK_SIZE:] + draw(9)]
    return [Request(i, prompt, 6, arrival=3 * i) for i, prompt in enumerate(prompts)]


@pytest.mark.exactness
def test_prefix_cache_hits_are_exact(backend, load_runner, checkpoint, record):
    runner = load(backend, load_runner, checkpoint, Batching.PAGED_PREFIX)
    requests = prefix_requests(checkpoint.config.vocab_size)
    config = WORKLOADS["random-arrivals"].config(Batching.PAGED_PREFIX, max_len(checkpoint))
    cached = serve(runner, requests, config)
    uncached = serve(runner, requests, replace(config, batching=Batching.PAGED))
    hits = [c.cached_tokens[0] for c in cached.completions]
    assert all(hit % BLOCK_SIZE == 0 for hit in hits), f"cached-token counts {hits} not multiples of {BLOCK_SIZE}"
    assert hits[4] == 0, f"a block equal to another's second block was taken for a first block: hits {hits}"
    assert hits[:4] == [0, SHARED, SHARED, SHARED], f"cached-token counts {hits}; expected the shared prefix"
    record(max_abs_logit_error=assert_each_as_alone(runner, cached))
    for with_cache, without in zip(cached.completions, uncached.completions):
        assert with_cache.tokens == without.tokens
        error = float((with_cache.logits - without.logits).abs().max())
        assert error <= logit_bound(without.logits), f"cached run differs from uncached by {error:.3g}"
    assert_no_leak(cached)
    assert cached.stats.block_accounting["cached_unreferenced"] > 0, "nothing stayed in the prefix cache"
    record(prefix_tokens_skipped=sum(hits))


@pytest.mark.exactness
@pytest.mark.parametrize("length", [3 * BLOCK_SIZE, 3 * BLOCK_SIZE + 1])
def test_fully_cached_prompt_computes_its_last_token(backend, load_runner, checkpoint, length):
    """The second time a prompt is served every one of its full blocks is cached; its last token is still
    computed (its logits choose the first new token), so at most length - 1 tokens come from the cache."""
    runner = load(backend, load_runner, checkpoint, Batching.PAGED_PREFIX)
    request = Request(0, tuple(range(1, length + 1)), 4)
    config = ServingConfig(Batching.PAGED_PREFIX, kv_tokens=1024, block_size=BLOCK_SIZE, pool_fill=float("nan"))
    memory = paged_memory(runner, config)
    first = serve(runner, [request], config, memory)
    again = serve(runner, [request], config, memory)
    expected_hit = (length - 1) // BLOCK_SIZE * BLOCK_SIZE
    assert again.completions[0].cached_tokens == [expected_hit], (
        f"{length}-token prompt served again: {again.completions[0].cached_tokens} tokens cached, "
        f"expected {expected_hit}")
    assert_each_as_alone(runner, first)
    assert_each_as_alone(runner, again)
    assert_no_leak(again)


def noisy_copy(checkpoint: Checkpoint) -> Checkpoint:
    """Another model of the same shape (so it can share the pool): the weights with seeded noise added."""
    generator = torch.Generator().manual_seed(21)
    weights = {name: w + 0.05 * w.float().std() * torch.randn(w.shape, generator=generator)
               for name, w in checkpoint.weights.items()}
    return Checkpoint(f"{checkpoint.name}-noisy", checkpoint.config, weights)


_NOISY: dict[str, Checkpoint] = {}


@pytest.mark.exactness
def test_salt_separates_models(backend, load_runner, checkpoint):
    """Two models serve the same prompts through one pool and prefix cache: the second never hits the first's
    blocks (which would give it the first model's keys and values), while serving a model again does hit."""
    require(backend, f"batching:{Batching.PAGED_PREFIX.value}")
    other = load_runner(_NOISY.setdefault(checkpoint.name, noisy_copy(checkpoint)), Strategy())
    first = load_runner(checkpoint, Strategy())  # loaded last: the record names the --model checkpoint
    requests = prefix_requests(checkpoint.config.vocab_size)[:2]
    config = ServingConfig(Batching.PAGED_PREFIX, kv_tokens=1024, block_size=BLOCK_SIZE, pool_fill=float("nan"))
    memory = paged_memory(first, config)
    serve(first, requests, config, memory)
    result = serve(other, requests, config, memory)
    hits = [c.cached_tokens[0] for c in result.completions]
    assert hits[0] == 0, f"the other model found {hits[0]} tokens of the first model's blocks in the cache"
    assert_each_as_alone(other, result)
    again = serve(first, requests, config, memory)
    assert again.completions[0].cached_tokens[0] > 0, "the same model serving the same prompt again found nothing"
    assert_no_leak(again)


@pytest.mark.exactness
def test_sampling_with_a_seed_per_request(backend, load_runner, checkpoint, batching, record):
    """Each request samples with its own generator: its tokens are those it samples alone with its seed."""
    runner = load(backend, load_runner, checkpoint, batching)
    spec = WORKLOADS["random-arrivals"]
    requests = spec.requests(checkpoint.config.vocab_size, Sampling(temperature=1.0, top_k=50))[:6]
    result = serve(runner, requests, spec.config(batching, max_len(checkpoint)))
    record(max_abs_logit_error=assert_each_as_alone(runner, result))
    assert len({tuple(c.tokens) for c in result.completions}) > 1


SAMPLED = Sampling(temperature=1.0, top_k=50)


def parallel_sample_requests(vocab: int, lengths: list[tuple[int, int, int, Sampling]]) -> list[Request]:
    """A request per (samples, prompt tokens, new tokens, sampling), all arriving at once."""
    generator = torch.Generator().manual_seed(13)
    return [Request(i, tuple(torch.randint(1, vocab, (prompt,), generator=generator).tolist()), new,
                    sampling=sampling, seed=2000 + i, samples=samples)
            for i, (samples, prompt, new, sampling) in enumerate(lengths)]


def copies_needed(requests: list[Request]) -> int:
    """Copies on write when each group forks once: every sample but the last to write copies a partial last block."""
    return sum(r.samples - 1 for r in requests if len(r.prompt) % BLOCK_SIZE)


def unshared_blocks(requests: list[Request]) -> int:
    """Blocks every sample would hold at its end with no sharing."""
    return sum(r.samples * -(-(len(r.prompt) + r.max_new_tokens) // BLOCK_SIZE) for r in requests)


def assert_samples_shared(result, requests: list[Request], preempted: bool) -> None:
    """The paged books: the prompts' blocks were shared (fewer held than unshared samples take), each partial one
    copied on write exactly once per extra sample (more after a recompute), and nothing leaked."""
    books = result.stats.block_accounting
    copies = copies_needed(requests)
    assert (books["copies_on_write"] >= copies) if preempted else (books["copies_on_write"] == copies), (
        f"{books['copies_on_write']} copies on write; the shared partial prompt blocks need {copies} (batching "
        "copy-on-write)")
    assert result.stats.peak_blocks_held < unshared_blocks(requests), (
        f"{result.stats.peak_blocks_held} blocks held at the peak, not fewer than the {unshared_blocks(requests)} "
        "of unshared samples: the prompts' blocks were not shared")
    assert_no_leak(result)


@pytest.mark.exactness
def test_parallel_samples_as_alone(backend, load_runner, checkpoint, batching, record):
    """Requests of 4 sampled, 3 greedy and 2 sampled parallel samples, with prompts of 37, 21 and 32 tokens (a
    partial last block, shared until each sample's first write, except the block-aligned one): each sample as
    its seed alone."""
    runner = load(backend, load_runner, checkpoint, batching)
    requests = parallel_sample_requests(checkpoint.config.vocab_size, [(4, 37, 10, SAMPLED), (3, 21, 6, Sampling()),
                                                                        (2, 32, 8, SAMPLED)])
    result = serve(runner, requests, WORKLOADS["burst-16"].config(batching, max_len(checkpoint)))
    record(max_abs_logit_error=assert_each_as_alone(runner, result), peak_blocks_held=result.stats.peak_blocks_held)
    samples = {r.id: [tuple(c.tokens) for c in result.completions if c.request.id == r.id] for r in requests}
    assert len(set(samples[1])) == 1, f"greedy samples differ: {samples[1]}"
    assert len(set(samples[0])) > 1, f"4 samples at temperature 1 drew the same tokens: {samples[0]}"
    if batching in PAGED:
        assert_samples_shared(result, requests, preempted=False)


@pytest.mark.exactness
def test_parallel_samples_preempted_and_recomputed(backend, load_runner, checkpoint, batching, record):
    """Two groups of sampled parallel samples outgrow a 12-block pool: the later group is preempted whole and
    recomputed (its prompt once, then each sample's own tokens); each sample still equals its seed alone."""
    if batching not in PAGED:
        pytest.skip(f"{batching.value} has no block pool: nothing is shared or preempted")
    runner = load(backend, load_runner, checkpoint, batching)
    requests = parallel_sample_requests(checkpoint.config.vocab_size, [(3, 37, 20, SAMPLED), (2, 40, 24, SAMPLED)])
    config = replace(WORKLOADS["small-pool"].config(batching, max_len(checkpoint)), kv_tokens=12 * BLOCK_SIZE)
    result = serve(runner, requests, config)
    record(max_abs_logit_error=assert_each_as_alone(runner, result), preemptions=result.stats.preemptions)
    assert result.stats.preemptions > 0, "the 12-block pool never forced a preemption"
    assert_samples_shared(result, requests, preempted=True)


# --- bench: serving metrics (vLLM's `bench serve` definitions: harness/latency.py) ----------------

BENCH_REQUESTS = 32
BENCH_RATES = [pytest.param(rate, id=f"rate{rate:g}") for rate in (2.0, 8.0, math.inf)]  # requests/s
BENCH_MAX_BATCH = 16
BENCH_STEP_TOKENS = 512
FIXED_KV_TOKENS = 2048  # the budget the concurrency test shares out
SHARING = [pytest.param(share, id=f"sharing{round(100 * share)}") for share in (0.0, 0.25, 0.5, 0.75, 0.9)]
SHARING_RATE = 8.0


def bench_config(batching: Batching, checkpoint: Checkpoint, **overrides) -> ServingConfig:
    """The same KV budget for every strategy: room for BENCH_MAX_BATCH sequences of the maximum length."""
    kv_tokens = BENCH_MAX_BATCH * max_len(checkpoint)
    return replace(ServingConfig(batching, max_batch=BENCH_MAX_BATCH, step_tokens=BENCH_STEP_TOKENS,
                                 kv_tokens=kv_tokens), **overrides)


def warm_up(runner, config: ServingConfig) -> None:
    serve(runner, [Request(0, (1, 2, 3), 2), Request(1, (4, 5), 2)], config)


def serving_record(result, slo: dict[str, float] | None = None) -> dict[str, float]:
    stats = result.stats
    return {**serving_metrics(result.completions, slo), "kv_waste_pct": 100 * stats.kv_waste,
            "preemptions": stats.preemptions, "max_running": stats.max_running, "steps": stats.steps}


@pytest.mark.bench
@pytest.mark.parametrize("rate", BENCH_RATES)
@pytest.mark.parametrize("profile", ["fixed", "heavy-tailed"])
def test_serving(backend, load_runner, checkpoint, batching, profile, rate, burstiness, slo, record):
    """BENCH_REQUESTS requests of `profile` arriving by a gamma process (--burstiness; 1: Poisson) at `rate`,
    served under the same KV budget by each strategy: throughput, goodput under --slo, TTFT, TPOT, ITL, E2EL,
    KV waste."""
    runner = load(backend, load_runner, checkpoint, batching)
    config = bench_config(batching, checkpoint)
    warm_up(runner, config)
    requests = make_requests(checkpoint, PROFILES[profile], BENCH_REQUESTS, rate=rate, burstiness=burstiness, seed=7)
    result = serve(runner, requests, config, clock=WallClock())
    record.params(kv_tokens=config.kv_tokens, max_batch=config.max_batch, requests=BENCH_REQUESTS,
                  burstiness=burstiness, slo=slo_label(slo))
    record(**serving_record(result, slo))


@pytest.mark.bench
def test_concurrency_at_a_fixed_kv_budget(backend, load_runner, checkpoint, batching, record):
    """Every request at once, FIXED_KV_TOKENS of KV memory, no cap on running sequences: how many run together."""
    if batching in (Batching.SEQUENTIAL, Batching.STATIC):
        pytest.skip(f"{batching.value} has no KV budget: it runs a fixed batch size")
    runner = load(backend, load_runner, checkpoint, batching)
    config = bench_config(batching, checkpoint, kv_tokens=FIXED_KV_TOKENS, max_batch=64)
    warm_up(runner, config)
    requests = make_requests(checkpoint, PROFILES["fixed"], 48, seed=8)
    result = serve(runner, requests, config, clock=WallClock())
    record.params(kv_tokens=FIXED_KV_TOKENS)
    record(**serving_record(result))


@pytest.mark.bench
@pytest.mark.parametrize("sharing", SHARING)
def test_prefix_sharing(backend, load_runner, checkpoint, sharing, burstiness, record):
    """A system prompt shared by a fraction of the requests: prefill tokens the prefix cache skips, and mean TTFT
    with and without it, measured side by side."""
    require(backend, f"batching:{Batching.PAGED_PREFIX.value}")
    runner = load_runner(checkpoint, Strategy())
    profile = PROFILES["shared-prefix"]
    requests = make_requests(checkpoint, profile, BENCH_REQUESTS, rate=SHARING_RATE, burstiness=burstiness,
                             sharing=sharing, seed=9)
    runs = {}
    for batching in (Batching.PAGED, Batching.PAGED_PREFIX):
        config = bench_config(batching, checkpoint)
        warm_up(runner, config)
        runs[batching] = serve(runner, requests, config, clock=WallClock())
    with_cache, without = (serving_metrics(runs[b].completions) for b in (Batching.PAGED_PREFIX, Batching.PAGED))
    prefix = system_prompt(checkpoint, profile)
    sharers = [c for c in runs[Batching.PAGED_PREFIX].completions if c.request.prompt[:len(prefix)] == prefix]
    skipped = sum(c.cached_tokens[0] for c in runs[Batching.PAGED_PREFIX].completions)
    skipped_of_prefix = sum(min(c.cached_tokens[0], len(prefix)) for c in sharers)
    record.params(rate=SHARING_RATE, shared_prefix=profile.shared_prefix, burstiness=burstiness)
    record(prefix_tokens_skipped=skipped,
           shared_prefix_skipped_pct=100 * skipped_of_prefix / (len(sharers) * len(prefix)) if sharers else 0.0,
           ttft_mean_ms=with_cache["ttft_mean_ms"], ttft_mean_ms_uncached=without["ttft_mean_ms"],
           ttft_cut_pct=100 * (1 - with_cache["ttft_mean_ms"] / without["ttft_mean_ms"]),
           output_throughput=with_cache["output_throughput"],
           output_throughput_uncached=without["output_throughput"])


PARALLEL_SAMPLES = 4
ROUNDS = 3  # alternating runs of the configurations a bench test compares; medians reported


def alternately(runner, runs: dict[str, tuple[list[Request], ServingConfig]]) -> dict[str, list]:
    """Each named (requests, config) served ROUNDS times, one after another in turn, after a warm-up of each."""
    for _, config in runs.values():
        warm_up(runner, config)
    results = {name: [] for name in runs}
    for _ in range(ROUNDS):
        for name, (requests, config) in runs.items():
            results[name].append(serve(runner, requests, config, clock=WallClock()))
    return results


def median_throughput(results: list) -> float:
    return statistics.median(serving_metrics(r.completions)["output_throughput"] for r in results)


def throughput_ratio(results: list, baseline: list) -> float:
    """Median over rounds of the output throughput ratio, each round's two runs back to back."""
    return statistics.median(serving_metrics(a.completions)["output_throughput"]
                             / serving_metrics(b.completions)["output_throughput"] for a, b in zip(results, baseline))


@pytest.mark.bench
def test_parallel_sampling(backend, load_runner, checkpoint, batching, record):
    """BENCH_REQUESTS heavy-tailed requests of PARALLEL_SAMPLES samples each at temperature 1, all at once: the KV
    blocks held at the peak when each request's samples share its prompt's blocks (copy-on-write), against the same
    samples sent as requests of their own; output throughput both ways, run alternately."""
    if batching not in PAGED:
        pytest.skip(f"{batching.value} has no block pool: its samples share no memory")
    runner = load(backend, load_runner, checkpoint, batching)
    requests = [replace(r, sampling=SAMPLED, samples=PARALLEL_SAMPLES)
                for r in make_requests(checkpoint, PROFILES["heavy-tailed"], BENCH_REQUESTS, seed=7)]
    unshared = [Request(r.id * PARALLEL_SAMPLES + i, r.prompt, r.max_new_tokens, r.arrival, r.sampling,
                        sample_seed(r.seed, i)) for r in requests for i in range(PARALLEL_SAMPLES)]
    config = bench_config(batching, checkpoint)
    runs = alternately(runner, {"shared": (requests, config), "unshared": (unshared, config)})
    shared, separate = runs["shared"][0], runs["unshared"][0]
    assert [c.tokens for c in shared.completions] == [c.tokens for c in separate.completions], \
        "a sample's tokens differ from the same sample sent as a request of its own"
    record.params(profile="heavy-tailed", samples=PARALLEL_SAMPLES, requests=BENCH_REQUESTS, kv_tokens=config.kv_tokens,
                  max_batch=config.max_batch)
    record(peak_blocks_held=shared.stats.peak_blocks_held, peak_blocks_held_unshared=separate.stats.peak_blocks_held,
           blocks_saved_pct=100 * (1 - shared.stats.peak_blocks_held / separate.stats.peak_blocks_held),
           copies_on_write=shared.stats.block_accounting["copies_on_write"],
           output_throughput=median_throughput(runs["shared"]),
           output_throughput_unshared=median_throughput(runs["unshared"]),
           output_throughput_ratio=throughput_ratio(runs["shared"], runs["unshared"]))


BLOCK_SIZES = [pytest.param(size, id=f"block{size}") for size in (4, 8, 16, 32)]


@pytest.mark.bench
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_block_size_sweep(backend, load_runner, checkpoint, block_size, record):
    """paged, heavy-tailed requests all at once (the KV-waste goal's run) by block size: KV waste (reserved slots
    holding no token: the last block's internal fragmentation) and output throughput, as a ratio to the default
    block size run alternately in this test."""
    require(backend, f"batching:{Batching.PAGED.value}")
    runner = load_runner(checkpoint, Strategy())
    requests = make_requests(checkpoint, PROFILES["heavy-tailed"], BENCH_REQUESTS, seed=7)
    runs = alternately(runner, {size: (requests, bench_config(Batching.PAGED, checkpoint, block_size=size))
                                for size in dict.fromkeys((block_size, DEFAULT_BLOCK_SIZE))})
    result = runs[block_size][0]
    record.params(profile="heavy-tailed", requests=BENCH_REQUESTS, kv_tokens=bench_config(Batching.PAGED,
                                                                                          checkpoint).kv_tokens)
    record(kv_waste_pct=100 * result.stats.kv_waste, peak_blocks_held=result.stats.peak_blocks_held,
           output_throughput=median_throughput(runs[block_size]),
           output_throughput_ratio=throughput_ratio(runs[block_size], runs[DEFAULT_BLOCK_SIZE]))
