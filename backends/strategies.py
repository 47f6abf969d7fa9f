"""Named strategies: the same names appear in option values, test ids, records and table rows."""
from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Quant(StrEnum):
    """How weights (and activations) are stored and computed."""

    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"
    INT8_DYNAMIC = "int8-dynamic"
    INT4_BLOCK32 = "int4-block32"
    INT4_BLOCK128 = "int4-block128"
    FP8 = "fp8"  # e4m3 weights, one fp32 scale per output channel
    INT8_WEIGHT = "int8-weight"  # int8 weights per output channel, fp32 activations
    INT4_GPTQ_BLOCK128 = "int4-gptq-block128"  # the int4-block128 format, weights chosen by GPTQ on training text
    INT8_KV = "int8-kv"  # fp32 weights; keys and values stored int8 (one scale per token and head), fp32 compute
    FP16_KV = "fp16-kv"  # fp32 weights; keys and values stored fp16, fp32 compute


class Attention(StrEnum):
    """Which attention implementation runs prefill and cached decode."""

    NAIVE = "naive"  # scores materialized
    SDPA = "sdpa"  # torch.nn.functional.scaled_dot_product_attention
    FLASH = "flash"  # tiled online softmax
    NATIVE = "native"  # whatever a non-torch backend fuses itself


class Execution(StrEnum):
    """How a single-token decode step runs."""

    EAGER = "eager"  # op by op from Python
    # one torch.compile (inductor) graph per batch size and cache capacity, fixed-shape (gpt-fast's decode step)
    COMPILED = "compiled"


class Batching(StrEnum):
    """How requests are scheduled onto the model (backends/serving/); a backend declares `batching:<name>`."""

    SEQUENTIAL = "sequential"  # one request at a time
    STATIC = "static"  # fixed left-padded batches, each run until its longest request finishes
    CONTINUOUS = "continuous"  # admitted and retired every step, contiguous per-row cache (Orca)
    PAGED = "paged"  # continuous over a block pool with block tables (vLLM's PagedAttention)
    PAGED_PREFIX = "paged-prefix"  # paged, plus automatic prefix caching of full blocks


@dataclass(frozen=True)
class Strategy:
    """The strategy a model is loaded under."""

    quant: Quant = Quant.FP32
    attention: Attention | None = None  # None: the backend's default
    execution: Execution = Execution.EAGER

    @property
    def id(self) -> str:
        names = [self.quant, self.attention, None if self.execution == Execution.EAGER else self.execution]
        return "-".join(name.value for name in names if name is not None)

    def as_record(self) -> dict[str, str]:
        """The strategy's names (eager execution, the default, is left out, as in records made before it existed)."""
        record = {"quant": self.quant.value}
        if self.attention is not None:
            record["attention"] = self.attention.value
        if self.execution != Execution.EAGER:
            record["execution"] = self.execution.value
        return record


def parse_quant(name: str) -> Quant:
    try:
        return Quant(name)
    except ValueError:
        raise ValueError(f"unknown quantization strategy {name!r}; accepted: {', '.join(q.value for q in Quant)}") from None


def parse_attention(name: str) -> Attention:
    try:
        return Attention(name)
    except ValueError:
        raise ValueError(f"unknown attention strategy {name!r}; accepted: {', '.join(a.value for a in Attention)}") from None


def parse_batching(name: str) -> Batching:
    try:
        return Batching(name)
    except ValueError:
        raise ValueError(f"unknown batching strategy {name!r}; accepted: {', '.join(b.value for b in Batching)}") from None
