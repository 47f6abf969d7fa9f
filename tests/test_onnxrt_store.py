"""The on-disk cache of ONNX files: hits, and nothing half-written, truncated or foreign is ever trusted."""
import json
import shutil

import pytest
import torch

from backends.strategies import Quant, Strategy
from backends.torch_ref import TorchBackend
from harness.models import small_checkpoint
from harness.oracles import max_abs_error

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed: the onnxrt backend's cache is untestable")
from backends.onnxrt import store  # noqa: E402  (needs onnxruntime)
from backends.onnxrt.runner import OrtRunner  # noqa: E402

KEY = {"fingerprint": "0123456789abcdef", "strategy": "fp32", "format": "test"}
CONTENT = b"model bytes " * 1000


class Builder:
    """A stand-in for the export: counts its calls, optionally dies halfway through writing."""

    def __init__(self, die_after: int | None = None):
        self.calls = 0
        self.die_after = die_after

    def __call__(self, path):
        self.calls += 1
        if self.die_after is not None:
            path.write_bytes(CONTENT[: self.die_after])
            raise KeyboardInterrupt  # the user pressed ^C in the middle of an export
        path.write_bytes(CONTENT)


def entries(root):
    return sorted(p.name for p in (root / "onnx").iterdir())


def test_a_second_fetch_is_a_hit(tmp_path):
    build = Builder()
    first = store.fetch(KEY, build, tmp_path)
    second = store.fetch(KEY, build, tmp_path)
    assert (first.built, second.built, build.calls) == (True, False, 1)
    assert first.path == second.path and second.path.read_bytes() == CONTENT
    manifest = json.loads((first.path.parent / store.MANIFEST_FILE).read_text())
    assert manifest["key"] == KEY and manifest["bytes"] == len(CONTENT)


def test_a_different_key_is_a_different_entry(tmp_path):
    build = Builder()
    store.fetch(KEY, build, tmp_path)
    store.fetch({**KEY, "strategy": "fp16"}, build, tmp_path)
    assert build.calls == 2 and len(entries(tmp_path)) == 2


def test_a_truncated_file_is_rebuilt(tmp_path):
    build = Builder()
    path = store.fetch(KEY, build, tmp_path).path
    path.write_bytes(CONTENT[:100])
    again = store.fetch(KEY, build, tmp_path)
    assert again.built and build.calls == 2 and again.path.read_bytes() == CONTENT


def test_a_replaced_file_of_the_same_size_is_rebuilt(tmp_path):
    build = Builder()
    path = store.fetch(KEY, build, tmp_path).path
    path.write_bytes(CONTENT.replace(b"model", b"MODEL"))
    assert store.fetch(KEY, build, tmp_path).built and build.calls == 2


def test_an_entry_whose_manifest_names_another_key_is_rebuilt(tmp_path):
    build = Builder()
    path = store.fetch(KEY, build, tmp_path).path
    manifest_file = path.parent / store.MANIFEST_FILE
    manifest = json.loads(manifest_file.read_text())
    manifest_file.write_text(json.dumps({**manifest, "key": {**KEY, "format": "older"}}))
    assert store.fetch(KEY, build, tmp_path).built and build.calls == 2


def test_an_interrupted_build_leaves_nothing_a_later_run_trusts(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        store.fetch(KEY, Builder(die_after=500), tmp_path)
    assert entries(tmp_path) == []  # the staging directory went with the interrupted build
    build = Builder()
    assert store.fetch(KEY, build, tmp_path).built and build.calls == 1


def test_a_killed_build_leaves_only_an_ignored_temporary(tmp_path):
    """A process killed mid-export runs no cleanup: its half-written staging directory must never be read."""
    leftover = tmp_path / "onnx" / f"{store.TMP_PREFIX}killed"
    leftover.mkdir(parents=True)
    (leftover / store.MODEL_FILE).write_bytes(CONTENT[:500])
    # a copy interrupted after the model file but before the manifest, under the entry's own name
    final = tmp_path / "onnx" / store.entry_name(KEY)
    final.mkdir()
    (final / store.MODEL_FILE).write_bytes(CONTENT[:500])
    build = Builder()
    entry = store.fetch(KEY, build, tmp_path)
    assert entry.built and build.calls == 1 and entry.path.read_bytes() == CONTENT


def test_an_exported_model_is_cached_and_usable_away_from_the_cache(tmp_path):
    checkpoint = small_checkpoint("rope", "gqa")
    first = store.model_file(checkpoint, Quant.FP32, tmp_path)
    second = store.model_file(checkpoint, Quant.FP32, tmp_path)
    assert first.built and not second.built
    elsewhere = tmp_path / "elsewhere" / "decoder.onnx"
    elsewhere.parent.mkdir()
    shutil.copy(second.path, elsewhere)
    shutil.rmtree(tmp_path / "onnx")
    tokens, positions = torch.tensor([[3, 1, 4, 1, 5]]), torch.arange(5)[None]
    logits = OrtRunner(checkpoint, Strategy(), elsewhere).forward_full(tokens, positions)
    expected = TorchBackend().load(checkpoint, Strategy()).forward_full(tokens, positions)
    assert max_abs_error(logits, expected) <= 1e-4


def test_a_quantized_model_is_derived_from_the_cached_fp32_export(tmp_path):
    checkpoint = small_checkpoint("rope", "gqa")
    store.model_file(checkpoint, Quant.FP32, tmp_path)
    derived = store.model_file(checkpoint, Quant.INT8_DYNAMIC, tmp_path)
    assert derived.built and len(entries(tmp_path)) == 2
    assert not store.model_file(checkpoint, Quant.INT8_DYNAMIC, tmp_path).built


def test_onnxrt_gptq_file_stores_exactly_torch_gptq_blocks():
    """int4-gptq-block128 is one format on both backends: the MatMulNBits weights and scales of the ONNX file are
    the blocks torch's GPTQ chose (the trained default model: calibration needs its tokenizer)."""
    import onnx
    from onnx import numpy_helper

    from backends.torch_ref.quantize import gptq_blocks
    from harness.models import DEFAULT_MODEL, resolve_model

    checkpoint = resolve_model(DEFAULT_MODEL)
    model = onnx.load(str(store.model_file(checkpoint, Quant.INT4_GPTQ_BLOCK128).path))
    tensors = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    stored = sorted((tensors[node.input[1]].tobytes(), tensors[node.input[2]].tobytes())
                    for node in model.graph.node if node.op_type == "MatMulNBits")
    chosen = sorted((blocks.packed.numpy().tobytes(), blocks.scales.numpy().tobytes())
                    for blocks in gptq_blocks(checkpoint).values())
    assert len(stored) == len(chosen) and stored == chosen
    assert not any(node.op_type == "MatMul" and node.input[1] in tensors for node in model.graph.node), \
        "a MatMul with a stored fp32 weight is left"
