"""Cross-backend faults: the onnxrt backend wrapped to change one thing on the way in or out, as a bug in an engine
would; suites/test_cross_backend.py judges it against the harness's fp64 reference."""
from __future__ import annotations

import onnx  # noqa: F401  (these, imported here rather than first inside a pytester run: pytester drops the
import onnxruntime.quantization  # noqa: F401  modules a run imported, and onnx's extension module aborts the
import onnxruntime.transformers.float16  # noqa: F401  process when it is imported a second time)
import torch

from backends.base import ModelRunner
from backends.onnxrt import OnnxRuntimeBackend
from backends.strategies import Quant

from . import Fault

SUITE = "suites/test_cross_backend.py"
CONFIGS = "(rope-gqa or alibi-mqa or learned-mha)"  # three position encodings, three attention kinds
FP32_SELECTION = f"(fp32_logits and {CONFIGS}) or greedy"
ORACLE_FAILURE = "FAILED *test_cross_backend.py::test_{test}* - AssertionError: *optimized error * exceeds 2.0 x plain*"


class WrappedRunner(ModelRunner):
    def __init__(self, inner: ModelRunner):
        super().__init__(inner.checkpoint, inner.strategy)
        self.inner = inner

    def new_cache(self, batch_size, capacity):
        return self.inner.new_cache(batch_size, capacity)

    def forward(self, cache, tokens, positions, token_mask=None):
        return self.inner.forward(cache, tokens, positions, token_mask)

    def forward_full(self, tokens, positions, token_mask=None):
        return self.inner.forward_full(tokens, positions, token_mask)


class ShiftedPositions(WrappedRunner):
    """Tokens after the first cached call get their position plus one (a cache-offset bug)."""

    def forward(self, cache, tokens, positions, token_mask=None):
        shift = 1 if int(cache.lengths.max()) > 0 else 0
        return self.inner.forward(cache, tokens, positions + shift, token_mask)


class ShiftedPositionsUnpadded(ShiftedPositions):
    """A cache-offset bug in a backend that takes no padding mask or explicit positions (as onnxruntime-genai):
    judged on each prompt alone from position 0, and greedy prompts of one length."""


class IgnoresPadding(WrappedRunner):
    """The padding mask is dropped, so real tokens attend to the left padding."""

    def forward(self, cache, tokens, positions, token_mask=None):
        return self.inner.forward(cache, tokens, positions, None)


class ScrambledLowPrecision(WrappedRunner):
    """Lossy strategies return the vocabulary columns in a wrong order (output channels misplaced by a
    quantizer); fp32 is left right, so only the lossy-strategy rules can catch it."""

    def forward(self, cache, tokens, positions, token_mask=None):
        return self.scramble(self.inner.forward(cache, tokens, positions, token_mask))

    def forward_full(self, tokens, positions, token_mask=None):
        return self.scramble(self.inner.forward_full(tokens, positions, token_mask))

    def scramble(self, logits: torch.Tensor) -> torch.Tensor:
        if self.strategy.quant == Quant.FP32:
            return logits
        order = torch.randperm(logits.shape[-1], generator=torch.Generator().manual_seed(0))
        return logits[..., order]


def planted(name: str, runner_cls: type[WrappedRunner], lacks: frozenset[str] = frozenset()) -> type[OnnxRuntimeBackend]:
    def load(self, checkpoint, strategy):
        return runner_cls(OnnxRuntimeBackend.load(self, checkpoint, strategy))

    def capabilities(cls) -> frozenset[str]:
        return OnnxRuntimeBackend.capabilities() - lacks

    return type(f"Planted{runner_cls.__name__}", (OnnxRuntimeBackend,),
                {"name": name, "load": load, "capabilities": classmethod(capabilities)})


def onnxrt_fault(name: str, runner_cls: type[WrappedRunner], selection: str, message: str, quants: tuple[str, ...],
                 failed: int, lacks: frozenset[str] = frozenset()) -> Fault:
    return Fault(name, "cross-backend", runner_cls.__doc__, SUITE, selection, message,
                 backend=planted(name, runner_cls, lacks), base_backend="onnxrt",
                 args=tuple(arg for quant in quants for arg in ("--quant", quant)), outcomes={"failed": failed})


FAULTS = [
    # fp32 logits on three configurations and the greedy tokens of the --model checkpoint
    onnxrt_fault("onnxrt-shifted-positions", ShiftedPositions, FP32_SELECTION,
                 ORACLE_FAILURE.format(test="fp32_logits"), ("fp32",), 3 + 1),
    onnxrt_fault("onnxrt-ignores-padding", IgnoresPadding, FP32_SELECTION,
                 ORACLE_FAILURE.format(test="fp32_logits"), ("fp32",), 3 + 1),
    # the same checks on the inputs a backend without padding masks or explicit positions takes (ortgenai's)
    onnxrt_fault("unpadded-shifted-positions", ShiftedPositionsUnpadded, "(fp32_logits and default-target) or greedy",
                 ORACLE_FAILURE.format(test="fp32_logits"), ("fp32",), 2,
                 lacks=frozenset({"padding-mask", "explicit-positions"})),
    # error far above torch fp16's (fp16) and above the simulated int8 format's (int8-dynamic)
    onnxrt_fault("onnxrt-scrambled-lowp", ScrambledLowPrecision, "oracle",
                 ORACLE_FAILURE.format(test="low_precision"), ("fp16", "int8-dynamic"), 2),
]
