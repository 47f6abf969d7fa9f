"""The onnxrt backend's fused graph (backends/onnxrt/fused_graph.py): which models it serves, and that it keeps
every cache semantic of the contract, judged against the fp64 reference with the general graph as the plain path."""
import pytest
import torch

from backends.checkpoint import RopeScaling
from backends.strategies import Quant, Strategy
from harness.models import random_checkpoint, small_checkpoint
from harness.oracles import assert_fp32_by_oracle
from harness.references import float64_reference

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed: the onnxrt backend's graphs are untestable")
from backends.onnxrt import store  # noqa: E402  (needs onnxruntime)
from backends.onnxrt.fused_graph import fused_graph_refusal  # noqa: E402
from backends.onnxrt.graph import export_decoder  # noqa: E402
from backends.onnxrt.runner import OrtRunner  # noqa: E402

ROPE = small_checkpoint("rope", "gqa").config


@pytest.mark.parametrize("change, reason", [
    ({"position": "alibi"}, "position 'alibi'"),
    ({"rope_scaling": RopeScaling("dynamic-ntk", 4.0)}, "'dynamic-ntk' depends on the sequence length"),
    ({"rotary_fraction": 0.5}, "partial rotary"),
    ({"d_model": 96}, "head_dim 24 (not a multiple of 16)"),
    ({"sliding_window": 8, "sliding_layers": (0,)}, "a sliding window"),
    ({"mlp": "gelu"}, "mlp 'gelu'"),
])
def test_the_refusal_names_what_the_fused_graph_cannot_express(change, reason):
    assert fused_graph_refusal(ROPE) is None
    assert reason in fused_graph_refusal(ROPE.replace(**change))


@pytest.mark.parametrize("position, graph", [("rope", "fused"), ("rope-yarn", "fused"), ("alibi", "general")])
def test_the_store_builds_the_fused_graph_where_it_applies(tmp_path, position, graph):
    checkpoint = small_checkpoint(position, "gqa")
    runner = OrtRunner(checkpoint, Strategy(), store.model_file(checkpoint, Quant.FP32, tmp_path).path)
    assert store.graph_kind(checkpoint, Quant.FP32) == graph
    assert runner.implementation.endswith(f"{graph} graph")


def ragged_steps(runner) -> torch.Tensor:
    """Logits of a sequence of calls that uses every cache semantic the fused graph maps onto its ops: a
    left-padded chunked prefill, rows rolled back by different amounts, positions that skip, and the no-cache
    path (a packed step runs each group of rows as one of these calls: runner.forward_packed)."""
    generator = torch.Generator().manual_seed(3)
    vocab = runner.config.vocab_size
    tokens = torch.randint(0, vocab, (3, 16), generator=generator)
    mask = torch.ones(3, 16, dtype=torch.bool)
    mask[1, :5] = False  # row 1 is left-padded: its pads are written but never attended to
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    cache = runner.new_cache(3, 32)
    out = [runner.forward(cache, tokens[:, :10], positions[:, :10], mask[:, :10]),
           runner.forward(cache, tokens[:, 10:14], positions[:, 10:14], mask[:, 10:14])]
    cache.truncate(torch.tensor([14, 11, 12]))  # speculative rejection: each row keeps its own length
    out.append(runner.forward(cache, tokens[:, 14:16], torch.tensor([[20, 21], [6, 7], [12, 40]])))
    out.append(runner.forward_full(tokens, positions, mask))
    return torch.cat([o.flatten(0, 1) for o in out])


@pytest.mark.parametrize("kind", ["mha", "gqa", "mqa"])
def test_the_fused_graph_keeps_the_cache_semantics(tmp_path, kind):
    checkpoint = random_checkpoint(small_checkpoint("rope", kind).config.replace(d_model=128), seed=1)  # head_dim 32
    fused = OrtRunner(checkpoint, Strategy(), store.model_file(checkpoint, Quant.FP32, tmp_path).path)
    export_decoder(checkpoint, tmp_path / "general.onnx")
    general = OrtRunner(checkpoint, Strategy(), tmp_path / "general.onnx")
    assert fused.implementation.endswith("fused graph")
    assert_fp32_by_oracle(ragged_steps(fused), ragged_steps(general), ragged_steps(float64_reference(checkpoint)))
