"""The onnxruntime-genai peer backend: without the package, loading skips naming it; what its Generator cannot do is
refused in one line naming the capability."""
from __future__ import annotations

import pytest
import torch

import backends.base
import backends.ortgenai_peer.backend as peer
from backends.base import BackendUnavailable, UnsupportedModel
from backends.strategies import Strategy
from harness.models import resolve_model


def test_without_onnxruntime_genai_loading_names_the_package(monkeypatch):
    def missing(name):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(backends.base.importlib, "import_module", missing)
    with pytest.raises(BackendUnavailable, match=r"onnxruntime-genai is not installed .*; pip install onnxruntime-genai"):
        peer.OrtGenaiBackend().load(resolve_model("default-target"), Strategy())


def test_a_layout_the_builder_lacks_is_refused_naming_it():
    from harness.models import small_checkpoint

    with pytest.raises(UnsupportedModel, match=r"small-alibi-gqa: built here only for plain-RoPE .* \(not ExactbenchDecoder"):
        peer.check_buildable(small_checkpoint("alibi", "gqa"))


def test_what_the_generator_cannot_do_is_refused_naming_the_capability():
    pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai (the peers extra) is not installed")
    runner = peer.OrtGenaiBackend().load(resolve_model("default-target"), Strategy())
    tokens = torch.ones(2, 4, dtype=torch.long)
    cache = runner.new_cache(2, 8)
    with pytest.raises(UnsupportedModel, match=r"not \[\[5, 6, 7, 8\], \[5, 6, 7, 8\]\] \(capability explicit-positions\)"):
        runner.forward(cache, tokens, torch.arange(5, 9).expand(2, -1))
    with pytest.raises(UnsupportedModel, match=r"no padding mask \(capability padding-mask\)"):
        runner.forward(cache, tokens, torch.arange(4).expand(2, -1), torch.tensor([[False] + [True] * 3] * 2))
    runner.forward(cache, tokens, torch.arange(4).expand(2, -1))
    with pytest.raises(UnsupportedModel, match="later calls take 1 token per row, not 2"):
        runner.forward(cache, tokens[:, :2], torch.arange(4, 6).expand(2, -1))
    with pytest.raises(UnsupportedModel, match=r"not to \[2, 2\] at batch 2 \(capability cache-rollback\)"):
        cache.truncate(torch.tensor([2, 2]))
    assert cache.lengths.tolist() == [4, 4], "a refused call must leave the cache as it was"
