"""One registry of backends: duplicates refused, third parties registered through the entry point group."""
import sys

import pytest

from backends import registry
from backends.torch_ref import TorchBackend

THIRD_PARTY = '''
from backends.torch_ref import TorchBackend


class ThirdPartyBackend(TorchBackend):
    name = "third-party"
'''


def test_a_second_backend_with_a_taken_name_is_refused():
    impostor = type("Impostor", (TorchBackend,), {"name": "torch"})
    with pytest.raises(ValueError, match="backend name 'torch' is already registered by backends.torch_ref"):
        registry.register(impostor)
    assert registry.get_backend("torch") is TorchBackend


def test_unknown_backend_names_the_available_ones():
    with pytest.raises(ValueError, match=r"unknown backend 'nope'; available: .*torch"):
        registry.get_backend("nope")


def test_a_package_registers_a_backend_through_the_entry_point_group(tmp_path, monkeypatch):
    (tmp_path / "third_party_engine.py").write_text(THIRD_PARTY)
    dist = tmp_path / "third_party_engine-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: third-party-engine\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        f"[{registry.ENTRY_POINT_GROUP}]\nthird-party = third_party_engine:ThirdPartyBackend\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert "third-party" in registry.available()
        assert registry.get_backend("third-party").__module__ == "third_party_engine"
    finally:
        registry.unregister("third-party")
        sys.modules.pop("third_party_engine", None)
