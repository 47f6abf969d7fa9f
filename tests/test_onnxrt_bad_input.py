"""Bad input to the onnxrt backend: one-line errors naming the cause, or a skip that names it."""
import sys
from pathlib import Path

import pytest
import torch

from backends.base import BackendUnavailable
from backends.onnxrt.backend import OnnxRuntimeBackend
from backends.strategies import Strategy
from harness.models import small_checkpoint

SUITE = str(Path(__file__).resolve().parents[1] / "suites" / "test_cross_backend.py")


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message, f"a multi-line error: {message!r}"
    return message


@pytest.fixture
def runner_class():
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed: no ONNX file can be opened")
    from backends.onnxrt.runner import OnnxModelError, OrtRunner

    return OrtRunner, OnnxModelError


def test_a_corrupt_file_is_named(tmp_path, runner_class):
    OrtRunner, OnnxModelError = runner_class
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\x08\x07 this is not a protobuf \xff\xfe")
    with pytest.raises(OnnxModelError) as error:
        OrtRunner(small_checkpoint("rope", "gqa"), Strategy(), path)
    assert one_line(error).startswith(f"{path}: not a loadable ONNX model")


def test_a_foreign_model_names_the_missing_inputs(tmp_path, runner_class):
    OrtRunner, OnnxModelError = runner_class
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Add", ["a", "b"], ["sum"])], "adder",
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in ("a", "b")],
                              [helper.make_tensor_value_info("sum", TensorProto.FLOAT, [2])])
    path = tmp_path / "adder.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    with pytest.raises(OnnxModelError) as error:
        OrtRunner(small_checkpoint("rope", "gqa"), Strategy(), path)
    message = one_line(error)
    assert "not an exactbench decoder step" in message and "'input_ids'" in message and "'a'" in message


def test_a_model_exported_for_another_configuration_is_refused(tmp_path, runner_class):
    OrtRunner, OnnxModelError = runner_class
    from backends.onnxrt import store

    path = store.model_file(small_checkpoint("rope", "gqa"), Strategy().quant, tmp_path).path
    with pytest.raises(OnnxModelError) as error:  # same input names, 4 KV heads instead of 2
        OrtRunner(small_checkpoint("rope", "mha"), Strategy(), path)
    assert "past_key_values.0.key" in one_line(error) and "(batch, 4, capacity, 16)" in str(error.value)
    with pytest.raises(OnnxModelError) as error:  # same shapes, other position encoding
        OrtRunner(small_checkpoint("learned", "gqa"), Strategy(), path)
    assert "exported from another model configuration" in one_line(error)


def test_token_ids_outside_the_vocabulary_are_named(runner_class):
    runner = OnnxRuntimeBackend().load(small_checkpoint("rope", "gqa"), Strategy())
    with pytest.raises(ValueError) as error:
        runner.forward(runner.new_cache(1, 4), torch.tensor([[1, 999]]), torch.tensor([[0, 1]]))
    assert "token id 999" in one_line(error) and "[0, 256)" in str(error.value)


def test_mismatched_shapes_are_named(runner_class):
    runner = OnnxRuntimeBackend().load(small_checkpoint("rope", "gqa"), Strategy())
    with pytest.raises(ValueError) as error:
        runner.forward(runner.new_cache(1, 4), torch.tensor([[1, 2]]), torch.tensor([[0, 1, 2]]))
    assert "tokens (1, 2), positions (1, 3)" in one_line(error)


def test_missing_onnxruntime_is_a_named_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what `import onnxruntime` sees when not installed
    with pytest.raises(BackendUnavailable) as error:
        OnnxRuntimeBackend().load(small_checkpoint("rope", "gqa"), Strategy())
    assert one_line(error).startswith("onnxruntime is not installed")


def test_missing_onnxruntime_skips_the_suites_naming_the_cause(pytester, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    result = pytester.runpytest_inprocess(SUITE, "--backend", "onnxrt", "-k", "fp32_logits and rope-gqa",
                                          "-p", "no:randomly", "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*backend onnxrt: onnxruntime is not installed*"])
