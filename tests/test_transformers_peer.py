"""The transformers peer backend: without the package, loading skips naming it; what its cache cannot do is
refused in one line naming the capability."""
from __future__ import annotations

import pytest
import torch

import backends.base
import backends.transformers_peer.backend as peer
from backends.base import BackendUnavailable, UnsupportedModel
from backends.strategies import Strategy
from harness.models import resolve_model


def test_without_transformers_loading_names_the_package(monkeypatch):
    def missing(name):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(backends.base.importlib, "import_module", missing)
    with pytest.raises(BackendUnavailable, match=r"transformers is not installed .*; pip install transformers"):
        peer.TransformersBackend().load(resolve_model("tiny-random"), Strategy())


def test_rolling_rows_back_to_different_lengths_is_refused_naming_the_capability():
    pytest.importorskip("transformers", reason="transformers (the peers extra) is not installed")
    runner = peer.TransformersBackend().load(resolve_model("tiny-random"), Strategy())
    cache = runner.new_cache(2, 8)
    runner.forward(cache, torch.ones(2, 4, dtype=torch.long), torch.arange(4).expand(2, -1))
    with pytest.raises(UnsupportedModel, match="not 2 lengths \\(capability cache-rollback\\)"):
        cache.truncate(torch.tensor([2, 3]))
    cache.truncate(torch.tensor([3, 3]))  # the whole batch to one length: what DynamicCache.crop does
    assert cache.lengths.tolist() == [3, 3]


def test_a_rope_variant_transformers_lacks_is_refused_not_run_as_plain_rope():
    pytest.importorskip("transformers", reason="transformers (the peers extra) is not installed")
    from harness.models import small_checkpoint

    with pytest.raises(UnsupportedModel, match=r"small-rope-ntk-gqa: transformers has no rope_type 'ntk' \(it has: "):
        peer.TransformersBackend().load(small_checkpoint("rope-ntk", "gqa"), Strategy())
