import pytest
import torch
import pandas  # noqa: F401  (loaded here, like scipy below: re-imported after an in-process run drops it, its
# extension types fail pandas' own identity checks, as the records tests did after the plugin tests in one process)
import scipy.optimize  # noqa: F401
import scipy.stats  # noqa: F401  (loaded here, outside pytester's in-process runs: those drop every module first
# imported inside them, and numpy's C extensions that scipy pulls in cannot be loaded twice in one process)

import backends.torch_ref  # noqa: F401  imported here, before any in-process pytester run: it imports torchao
# (when installed), which registers torch operator libraries that abort on a second import, and pytester's
# in-process runs drop every module first imported inside them
from backends import registry

# torch.compile imports inductor's modules lazily, at the first compile; some register themselves in global tables
# and fail when imported twice. Compile something tiny here, outside pytester's in-process runs (a planted fault's
# run compiles the torch backend's decode step, and would otherwise import them first and drop them).
with torch._functorch.config.patch(enable_autograd_cache=False):  # nothing pickled on disk, as the backend's step
    torch.compile(torch.neg, fullgraph=True, options={"fx_graph_cache": False})(torch.zeros(1))

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


@pytest.fixture(autouse=True)
def _inner_runs_are_not_xdist_workers(monkeypatch):
    """Under `pytest -n`, pytester's inner runs inherit PYTEST_XDIST_WORKER, and pytest-benchmark then disables
    itself in them; an inner run is a session of its own."""
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)


@pytest.fixture(autouse=True)
def _inner_runs_record_apart(monkeypatch, tmp_path_factory):
    """Runs that a test starts (pytester, subprocesses) write their records to a scratch directory of the test's
    own, never into the outer run's (whose planted faults would read as failures of the suites)."""
    monkeypatch.setenv("EXACTBENCH_RESULTS_DIR", str(tmp_path_factory.mktemp("inner-results")))
