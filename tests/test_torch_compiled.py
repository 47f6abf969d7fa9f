"""The torch backend's compiled execution: one graph per batch size and cache capacity, never one per step; what it
cannot compile is refused in one line. (Its exactness is judged by suites/test_kv_cache.py.)"""
import pytest
import torch
from torch._dynamo.utils import counters

from backends.algorithms.generation import generate
from backends.base import UnsupportedModel
from backends.strategies import Attention, Execution, Quant, Strategy
from backends.torch_ref.backend import TorchBackend
from harness.models import DEFAULT_MODEL, resolve_model
from suites.test_kv_cache import COMPILED, COMPILED_DECODE, compiled_prompts  # the suite's shape: compiled once


def test_decode_steps_compile_once_then_never_again():
    runner = TorchBackend().load(resolve_model(DEFAULT_MODEL), COMPILED)
    prompts = compiled_prompts(runner.config.vocab_size)
    graphs = counters["stats"]["unique_graphs"]
    generate(runner, prompts, COMPILED_DECODE)
    assert counters["stats"]["unique_graphs"] - graphs <= 1, "the decode steps of one batch shape compiled twice"
    # the rows swapped: other positions, slots and padding in every step, the same shapes
    with torch.compiler.set_stance("fail_on_recompile"):
        generate(runner, prompts[::-1], COMPILED_DECODE)


@pytest.mark.parametrize("strategy", [Strategy(Quant.INT4_BLOCK32, execution=Execution.COMPILED),
                                      Strategy(Quant.FP32, Attention.FLASH, Execution.COMPILED)],
                         ids=["int4-block32", "flash"])
def test_what_does_not_compile_is_refused_in_one_line(strategy):
    with pytest.raises(UnsupportedModel) as error:
        TorchBackend().load(resolve_model("tiny-random"), strategy)
    assert str(error.value) == (f"execution compiled runs quant fp32, bf16, fp16 with attention naive or sdpa, "
                                f"not {strategy.id}")
