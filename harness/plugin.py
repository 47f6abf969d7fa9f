"""The pytest plugin: options, fixtures, parametrization by backend and strategy, capability skips, records.

State lives on one HarnessSession in `config.stash`. Tests marked `exactness` or `bench` become records:
their parametrization (backend, strategy, the rest as parameters), outcome, the metrics they attach with
the `record` fixture and, for benchmarks, pytest-benchmark's statistics.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pytest
import torch

from backends.base import Backend, ModelRunner, UnsupportedModel, strategy_capabilities
from backends.checkpoint import Checkpoint, CheckpointError
from backends.registry import available, get_backend
from backends.strategies import Attention, Batching, Quant, Strategy, parse_attention, parse_batching, parse_quant

from .models import DEFAULT_MODEL, resolve_model
from .records import Record, current_commit, machine_info, merge_into

DEFAULT_BACKENDS = ["torch"]
DEFAULT_RESULTS_DIR = "results"
STRATEGY_FIXTURES = ("quant", "attention")
PARAMETRIZED_FIXTURES = (*STRATEGY_FIXTURES, "batching")  # batching is recorded as a parameter
STRATEGY_KINDS = {"quant": Quant, "attention": Attention, "batching": Batching}
RECORDED_MARKERS = ("exactness", "bench")


@dataclass
class RunnerCache:
    """Loaded runners, one per (backend, checkpoint, strategy), shared by every test of the session."""

    runners: dict[tuple, ModelRunner] = field(default_factory=dict)
    checkpoints: list[Checkpoint] = field(default_factory=list)  # kept alive so id() keys stay unique

    def get(self, backend: Backend, checkpoint: Checkpoint, strategy: Strategy) -> ModelRunner:
        key = (backend.name, id(checkpoint), strategy)
        if key not in self.runners:
            self.checkpoints.append(checkpoint)
            self.runners[key] = backend.load(checkpoint, strategy)
        return self.runners[key]


@dataclass
class HarnessSession:
    backends: list[str]
    quants: list[Quant] | None  # None: every quantization each backend declares
    attentions: list[Attention] | None  # None: every attention implementation each backend declares
    model: Checkpoint
    results_dir: Path
    batchings: list[Batching] | None = None  # None: every batching strategy each backend declares
    threads: int = field(default_factory=torch.get_num_threads)
    records: list[Record] = field(default_factory=list)
    runner_cache: RunnerCache = field(default_factory=RunnerCache)

    def strategy_values(self, backend: str, kind: str) -> list:
        chosen = {"quant": self.quants, "attention": self.attentions, "batching": self.batchings}[kind]
        if chosen is not None:
            return chosen
        declared = get_backend(backend).capabilities()
        return [value for value in STRATEGY_KINDS[kind] if f"{kind}:{value.value}" in declared]


SESSION = pytest.StashKey[HarnessSession]()
TEST_RECORD = pytest.StashKey["TestRecord"]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("exactbench", "exactbench: exactness and performance of LLM inference backends")
    group.addoption("--backend", action="append", metavar="NAME",
                    help=f"backend to run the suites on; repeat for several (default: {', '.join(DEFAULT_BACKENDS)})")
    group.addoption("--model", metavar="NAME_OR_PATH",
                    help=f"built-in model name or local Hugging Face directory (default: {DEFAULT_MODEL})")
    group.addoption("--quant", action="append", metavar="NAME",
                    help="quantization strategy; repeat for several (default: every one the backend declares). "
                         f"Names: {', '.join(q.value for q in Quant)}")
    group.addoption("--attention", action="append", metavar="NAME",
                    help="attention implementation; repeat for several (default: every one the backend declares). "
                         f"Names: {', '.join(a.value for a in Attention)}")
    group.addoption("--batching", action="append", metavar="NAME",
                    help="batching strategy; repeat for several (default: every one the backend declares). "
                         f"Names: {', '.join(b.value for b in Batching)}")
    group.addoption("--results-dir", metavar="DIR",
                    help=f"where records (records/*.json) are merged (default: {DEFAULT_RESULTS_DIR})")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "exactness: deterministic checks that an optimization changes nothing it must not")
    config.addinivalue_line("markers", "bench: timed or memory measurements, recorded and tabulated")
    try:
        backends = config.getoption("backend") or DEFAULT_BACKENDS
        for name in backends:
            get_backend(name)
        quants = [parse_quant(q) for q in config.getoption("quant")] if config.getoption("quant") else None
        attentions = ([parse_attention(a) for a in config.getoption("attention")]
                      if config.getoption("attention") else None)
        batchings = ([parse_batching(b) for b in config.getoption("batching")]
                     if config.getoption("batching") else None)
        model = resolve_model(config.getoption("model") or DEFAULT_MODEL)
    except (ValueError, CheckpointError) as error:
        raise pytest.UsageError(str(error)) from None
    results_dir = Path(config.getoption("results_dir") or DEFAULT_RESULTS_DIR)
    config.stash[SESSION] = HarnessSession(list(dict.fromkeys(backends)), quants, attentions, model, results_dir,
                                           batchings)


def pytest_report_header(config: pytest.Config) -> list[str]:
    session = config.stash[SESSION]
    return [f"exactbench: backends {', '.join(session.backends)} (available: {', '.join(available())}); "
            f"model {session.model.name}; machine {machine_info()['id']}"]


@pytest.hookimpl(tryfirst=True)
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize backend and strategies jointly, so each backend runs the strategies it declares."""
    if "backend" not in metafunc.fixturenames:
        return
    session = metafunc.config.stash[SESSION]
    kinds = [kind for kind in PARAMETRIZED_FIXTURES if kind in metafunc.fixturenames]
    combos: list[tuple] = [(name,) for name in session.backends]
    for kind in kinds:
        combos = [combo + (value,) for combo in combos for value in session.strategy_values(combo[0], kind)]
    ids = ["-".join(str(v) for v in combo) for combo in combos]
    metafunc.parametrize(["backend", *kinds], combos, ids=ids, indirect=["backend"])


def require(backend: Backend, *capabilities: str) -> None:
    """Skip the current test, naming backend and capability, unless the backend has every capability."""
    missing = backend.missing(*capabilities)
    if missing:
        pytest.skip(f"backend {backend.name} lacks capability {', '.join(missing)}")


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> Backend:
    return get_backend(request.param)()


@pytest.fixture(scope="session")
def checkpoint(request: pytest.FixtureRequest) -> Checkpoint:
    """The --model checkpoint."""
    return request.config.stash[SESSION].model


@pytest.fixture
def load_runner(request: pytest.FixtureRequest, backend: Backend):
    """load_runner(checkpoint, strategy) -> a session-cached runner of the test's backend; skips with the reason
    when the backend lacks a capability the strategy needs or cannot express the model."""
    session = request.config.stash[SESSION]

    def load(checkpoint: Checkpoint, strategy: Strategy) -> ModelRunner:
        require(backend, *strategy_capabilities(strategy))
        test_record = request.node.stash.get(TEST_RECORD, None)
        if test_record is not None:
            test_record.model = checkpoint.name
            test_record.strategy = strategy.as_record()
        try:
            return session.runner_cache.get(backend, checkpoint, strategy)
        except UnsupportedModel as error:
            pytest.skip(f"backend {backend.name}: {error}")

    return load


class TestRecord:
    """What a test attaches to its record: metrics, extra parameters, and the model/strategy it loaded."""

    __test__ = False  # not a test class

    def __init__(self, tier: str, model: str):
        self.tier = tier
        self.model = model
        self.strategy: dict[str, str] = {}
        self.metrics: dict[str, float] = {}
        self.extra_params: dict[str, object] = {}

    def __call__(self, **metrics: float) -> None:
        self.metrics.update({name: float(value) for name, value in metrics.items()})

    def params(self, **params: object) -> None:
        self.extra_params.update(params)


@pytest.fixture
def record(request: pytest.FixtureRequest) -> TestRecord:
    """record(**metrics) attaches numbers to this test's record; record.params(**p) adds parameters."""
    return request.node.stash[TEST_RECORD]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    tiers = [marker for marker in RECORDED_MARKERS if item.get_closest_marker(marker)]
    if tiers:
        item.stash[TEST_RECORD] = TestRecord(tiers[0], item.config.stash[SESSION].model.name)
    # Exactness checks run tiny models, where one thread is fastest and immune to a busy machine;
    # measurements use every thread, as a user would.
    torch.set_num_threads(1 if "bench" not in tiers else item.config.stash[SESSION].threads)


def _plain(value: object) -> object:
    return value if isinstance(value, (int, float, bool, str)) or value is None else str(value)


def _outcome(report: pytest.TestReport) -> tuple[str, str | None]:
    if hasattr(report, "wasxfail"):
        return ("xfailed" if report.skipped else "xpassed"), report.wasxfail or None
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        return "skipped", reason.removeprefix("Skipped: ")
    return report.outcome, None


def _benchmark_metrics(item: pytest.Item) -> dict[str, float]:
    bench = getattr(item, "funcargs", {}).get("benchmark")
    stats = getattr(getattr(bench, "stats", None), "stats", None)
    if stats is None or not getattr(stats, "data", None):
        return {}
    return {"median_s": stats.median, "mean_s": stats.mean, "min_s": stats.min, "stddev_s": stats.stddev,
            "rounds": float(stats.rounds)}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    test_record = item.stash.get(TEST_RECORD, None)
    decisive = (report.when == "call") or (report.when == "setup" and report.outcome != "passed")
    if test_record is None or not decisive:
        return report
    outcome, reason = _outcome(report)
    callspec = getattr(item, "callspec", None)
    params = {k: _plain(v) for k, v in (callspec.params if callspec else {}).items()}
    backend = params.pop("backend", None)
    strategy = test_record.strategy or {k: params[k] for k in STRATEGY_FIXTURES if k in params}
    for kind in STRATEGY_FIXTURES:
        params.pop(kind, None)
    params.update({k: _plain(v) for k, v in test_record.extra_params.items()})
    item.config.stash[SESSION].records.append(Record(
        suite=item.module.__name__.rsplit(".", 1)[-1].removeprefix("test_"), tier=test_record.tier,
        test=item.nodeid, backend=backend, model=test_record.model, strategy=strategy, params=params,
        outcome=outcome, metrics={**test_record.metrics, **_benchmark_metrics(item)}, reason=reason,
        machine=machine_info(), commit=current_commit(), time=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    ))
    return report


def pytest_sessionfinish(session: pytest.Session) -> None:
    harness = session.config.stash.get(SESSION, None)
    if harness is None or not harness.records:
        return
    written = merge_into(harness.results_dir / "records", harness.records)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"exactbench: {len(harness.records)} records merged into "
                            f"{', '.join(str(p) for p in written)}")
