import pytest

from backends import registry

pytest_plugins = ["pytester"]


@pytest.fixture
def register_backend():
    """register_backend(cls) registers a (planted-fault) backend for this test only and returns its name."""
    names = []

    def add(cls) -> str:
        registry.register(cls)
        names.append(cls.name)
        return cls.name

    yield add
    for name in names:
        registry.unregister(name)
