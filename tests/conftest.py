import pytest

import backends.torch_ref  # noqa: F401  imported here, before any in-process pytester run: it imports torchao
# (when installed), which registers torch operator libraries that abort on a second import, and pytester's
# in-process runs drop every module first imported inside them
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
