"""Bad input to the quantization strategies: one-line errors naming the value and what is accepted, and nothing
left on disk that a later run would trust."""
import pytest
import torch

from backends.base import UnsupportedModel
from backends.checkpoint import Checkpoint
from backends.onnxrt.backend import OnnxRuntimeBackend
from backends.quant.formats import FormatError, Int4Blocks
from backends.strategies import Quant, Strategy
from backends.torch_ref.backend import TorchBackend
from backends.torch_ref.model import Transformer, init_random_weights
from backends.torch_ref.quantize import CalibrationUnavailable
from harness.quality import base_logprobs


def random_checkpoint(small_config) -> Checkpoint:
    model = Transformer(small_config)
    init_random_weights(model, torch.Generator().manual_seed(0))
    return Checkpoint("random-small", small_config, model.export_weights())


@pytest.fixture
def small_config():
    from backends.checkpoint import ModelConfig

    return ModelConfig(vocab_size=64, d_model=64, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=128,
                       max_position_embeddings=32)


def test_a_strategy_the_backend_does_not_offer_names_the_ones_it_does():
    with pytest.raises(UnsupportedModel) as error:
        OnnxRuntimeBackend.check_strategy(Strategy(Quant.FP8))
    message = str(error.value)
    assert "\n" not in message and "quant:fp8" in message
    assert "its quantization strategies: fp32, fp16, int8-dynamic, int4-block32, int4-block128" in message


def test_a_calibrated_method_without_calibration_text_is_refused(small_config):
    with pytest.raises(CalibrationUnavailable, match=r"int4-gptq-block128 needs calibration text.*'random-small' "
                                                     r"has no tokenizer\.json") as error:
        TorchBackend().load(random_checkpoint(small_config), Strategy(Quant.INT4_GPTQ_BLOCK128))
    assert "\n" not in str(error.value)


def test_onnxrt_calibrated_method_without_calibration_text_is_refused_and_nothing_cached(small_config, tmp_path,
                                                                                          monkeypatch):
    monkeypatch.setenv("EXACTBENCH_CACHE", str(tmp_path))
    with pytest.raises(CalibrationUnavailable, match=r"int4-gptq-block128 needs calibration text") as error:
        OnnxRuntimeBackend().load(random_checkpoint(small_config), Strategy(Quant.INT4_GPTQ_BLOCK128))
    assert "\n" not in str(error.value)
    assert [p.name for p in (tmp_path / "onnx").iterdir() if "int4-gptq" in p.name] == []
    assert not (tmp_path / "gptq").exists()


def test_a_group_size_that_does_not_divide_the_dimension_is_refused():
    with pytest.raises(FormatError, match=r"^group size 48 does not divide the input dimension 64; accepted here: "
                                          r"16, 32, 64$"):
        Int4Blocks.quantize(torch.ones(8, 64), 48)


def test_stored_base_logprobs_of_other_windows_are_not_trusted(tmp_path):
    path = tmp_path / "base.npz"
    windows = torch.arange(8).view(2, 4)
    first = base_logprobs(path, windows, lambda w: torch.zeros(4, 3))
    again = base_logprobs(path, windows, lambda w: pytest.fail("recomputed although stored for these windows"))
    assert torch.equal(first, again)
    other = base_logprobs(path, windows + 1, lambda w: torch.ones(4, 3))
    assert torch.equal(other, torch.ones(4, 3))
    path.write_bytes(b"truncated")
    assert torch.equal(base_logprobs(path, windows, lambda w: torch.full((4, 3), 2.0)), torch.full((4, 3), 2.0))
    assert [p.name for p in tmp_path.iterdir()] == ["base.npz"], "a temporary file was left behind"
