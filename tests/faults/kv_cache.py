"""KV-cache faults: the reference backend with one change to its runner or cache; suites/test_kv_cache.py."""
from __future__ import annotations

from backends.torch_ref.backend import TorchBackend, TorchRunner

from . import Fault

SUITE = "suites/test_kv_cache.py"
SDPA = ("--attention", "sdpa")
CASES = 1 + 7 * 3  # the --model checkpoint, then the matrix: 7 exact position encodings x MHA/GQA/MQA
ORACLE_FAILURE = "FAILED *test_kv_cache.py::test_{test}* - AssertionError: *optimized error * exceeds 2.0 x plain error*"


class RopeOffByOneRunner(TorchRunner):
    """Positions of tokens after the first cached call are off by one (a classic cache-offset bug)."""

    def forward(self, cache, tokens, positions, token_mask=None):
        shift = 1 if int(cache.lengths.max()) > 0 else 0
        return super().forward(cache, tokens, positions + shift, token_mask)


class IgnoresPaddingRunner(TorchRunner):
    """The padding mask is dropped: padded slots are attended to."""

    def forward(self, cache, tokens, positions, token_mask=None):
        return super().forward(cache, tokens, positions, None)


class NoRollbackRunner(TorchRunner):
    """truncate() is a no-op: rejected speculative tokens stay in the cache."""

    def new_cache(self, batch_size, capacity):
        cache = super().new_cache(batch_size, capacity)
        cache.truncate = lambda lengths: None
        return cache


class StaleCompiledPositionRunner(TorchRunner):
    """The compiled decode step keeps the rotary positions of the step it was compiled on (a value baked into the
    graph rather than passed in)."""

    def compiled_decode_step(self):
        step, first_ropes = super().compiled_decode_step(), []

        def stale(capacity, tokens, context, ropes):
            if not first_ropes:
                first_ropes.append(ropes)
            return step(capacity, tokens, context, first_ropes[0])

        return stale


def planted(name: str, runner_cls: type[TorchRunner]) -> type[TorchBackend]:
    """A reference backend named `name` whose runner is `runner_cls`."""
    return type(f"Planted{runner_cls.__name__}", (TorchBackend,), {"name": name, "runner_class": runner_cls})


FAULTS = [
    Fault("rope-off-by-one", "kv-cache", RopeOffByOneRunner.__doc__, SUITE,
          "cached_decode_matches_recompute or chunked_prefill", ORACLE_FAILURE.format(test="cached_decode"),
          backend=planted("rope-off-by-one", RopeOffByOneRunner), args=SDPA,
          # every model sees the shifted positions: the --model checkpoint and all 21 configurations, in both tests
          outcomes={"failed": 2 * CASES}),
    Fault("ignores-padding", "kv-cache", IgnoresPaddingRunner.__doc__, SUITE, "left_padded",
          ORACLE_FAILURE.format(test="left_padded"), backend=planted("ignores-padding", IgnoresPaddingRunner),
          args=SDPA, outcomes={"failed": CASES}),
    Fault("no-rollback", "kv-cache", NoRollbackRunner.__doc__, SUITE, "rollback_then_decode",
          ORACLE_FAILURE.format(test="rollback_then_decode"),
          backend=planted("no-rollback", NoRollbackRunner), args=SDPA, outcomes={"failed": 1}),
    Fault("compiled-stale-position", "kv-cache", StaleCompiledPositionRunner.__doc__, SUITE,
          "test_compiled",  # not "compiled": the planted backend's name, in every test id
          "FAILED *test_kv_cache.py::test_compiled_decode* - AssertionError: KV cache: compiled decode of a "
          "left-padded batch: optimized error * exceeds 2.0 x plain error*",
          backend=planted("compiled-stale-position", StaleCompiledPositionRunner), args=SDPA,
          outcomes={"failed": 2}),
]
