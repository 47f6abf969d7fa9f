"""The cross-implementation suite on a user's --model checkpoint: compared with transformers and named in the test
ids, a fault shows there too, and a layout transformers cannot read is skipped naming why. (The suite's planted
faults are in the registry, tests/faults/cross_implementation.py.)"""
from pathlib import Path

import pytest

import backends.torch_ref.model
from backends.checkpoint import ModelConfig
from harness.models import random_checkpoint

transformers = pytest.importorskip("transformers", reason="transformers (an optional test dependency) is not installed")
from .faults.cross_implementation import interleaved_rope  # noqa: E402  (also imports the classes the suite uses)

SUITE = str(Path(__file__).resolve().parents[1] / "suites" / "test_cross_implementation.py")


def run_on_model(pytester, model, backend: str = "torch"):
    """The suite on the --model checkpoint alone (the configuration matrix left out)."""
    return pytester.runpytest_inprocess(SUITE, "-m", "exactness and not config_matrix", "--backend", backend,
                                        "--model", str(model), "-p", "no:randomly", "-rA", "-q")


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    """A Qwen3 directory as transformers writes it: the user's own checkpoint, in a directory named my-qwen3."""
    from suites.test_cross_implementation import FAMILIES, redraw_weights

    _, model_class, keywords = FAMILIES["qwen3"]
    model = getattr(transformers, model_class)(transformers.Qwen3Config(**keywords))
    redraw_weights(model, seed=11)
    directory = tmp_path_factory.mktemp("user") / "my-qwen3"
    model.save_pretrained(directory)
    return directory


# --- the --model checkpoint ----------------------------------------------------------------------------


def test_the_model_checkpoint_is_compared_and_named(pytester, qwen3_dir):
    result = run_on_model(pytester, qwen3_dir)
    result.assert_outcomes(passed=3)  # logits, greedy with and without the cache: on my-qwen3 only
    result.stdout.fnmatch_lines(["PASSED*test_logits_match_transformers?torch-model-my-qwen3?"])
    result = run_on_model(pytester, qwen3_dir, backend="onnxrt")
    result.assert_outcomes(passed=3)


def test_a_fault_shows_on_the_model_checkpoint(pytester, qwen3_dir, monkeypatch):
    monkeypatch.setattr(backends.torch_ref.model, "apply_rope", interleaved_rope)
    result = run_on_model(pytester, qwen3_dir)
    result.assert_outcomes(failed=3)
    result.stdout.fnmatch_lines(["*test_logits_match_transformers?torch-model-my-qwen3?*",
                                 "*my-qwen3: logits differ from transformers'*"])


def test_a_model_transformers_cannot_read_is_skipped_naming_why(pytester, tmp_path):
    config = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64, position="alibi")
    random_checkpoint(config).save(tmp_path / "mine")
    result = run_on_model(pytester, tmp_path / "mine")
    result.assert_outcomes(skipped=3)
    result.stdout.fnmatch_lines(["*mine: transformers has no class for its layout (ExactbenchDecoder)*"])
