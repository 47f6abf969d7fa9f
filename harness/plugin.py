"""The pytest plugin: options, fixtures, parametrization by backend and strategy, capability skips, records.

State lives on one HarnessSession in `config.stash`. Tests marked `exactness`, `bench` or `faults` become records:
their parametrization (backend, strategy, the rest as parameters), outcome, the metrics they attach with
the `record` fixture and, for benchmarks, pytest-benchmark's statistics. Each record is appended to this run's
own file as its test finishes (harness/records.py); plain `pytest` writes under a scratch directory,
`--results-dir` (the main job: results/) publishes.
"""
from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pytest
import torch

from backends.base import Backend, ModelRunner, UnsupportedModel, strategy_capabilities
from backends.checkpoint import Checkpoint, CheckpointError
from backends.registry import available, get_backend
from backends.strategies import Attention, Batching, Quant, Strategy, parse_attention, parse_batching, parse_quant

from .latency import DEFAULT_SLO, SLO_METRICS, parse_slo, slo_label
from .models import DEFAULT_MODEL, resolve_model
from .records import Record, RunWriter, check_writable_dir, current_commit, machine_info, new_run_id, run_header
from .workloads import DEFAULT_BURSTINESS, parse_burstiness

DEFAULT_BACKENDS = ["torch"]
SCRATCH_RESULTS_DIR = ".exactbench/results"  # under the rootdir, gitignored: plain runs never touch results/
RESULTS_DIR_ENV = "EXACTBENCH_RESULTS_DIR"  # overrides the scratch directory (the harness's tests point inner runs away)
STRATEGY_FIXTURES = ("quant", "attention")
PARAMETRIZED_FIXTURES = (*STRATEGY_FIXTURES, "batching")  # batching is recorded as a parameter
STRATEGY_KINDS = {"quant": Quant, "attention": Attention, "batching": Batching}
RECORDED_MARKERS = ("exactness", "bench", "faults")


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
    writer: RunWriter
    shard: tuple[int, int] | None = None  # (index from 1, count)
    batchings: list[Batching] | None = None  # None: every batching strategy each backend declares
    slo: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_SLO))  # serving goodput's objectives, ms
    burstiness: float = DEFAULT_BURSTINESS  # serving benchmarks' gamma arrivals
    threads: int = field(default_factory=torch.get_num_threads)
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
    group.addoption("--slo", action="append", metavar="NAME:MS",
                    help="a service-level objective for serving goodput (vLLM's --goodput): the requests per second "
                         f"whose NAME ({', '.join(SLO_METRICS)}) is at most MS milliseconds; repeat for several, "
                         f"all must hold (default: {slo_label(DEFAULT_SLO)})")
    group.addoption("--burstiness", metavar="X",
                    help="serving benchmarks' arrivals: gamma inter-arrival times of shape X (1: Poisson, below 1: "
                         f"burstier, above 1: more regular; default: {DEFAULT_BURSTINESS:g})")
    group.addoption("--results-dir", metavar="DIR",
                    help="where this run's records file is written (DIR/records/<run id>.jsonl; default: "
                         f"{SCRATCH_RESULTS_DIR} under the rootdir, a scratch directory; the main job publishes "
                         "into results)")
    group.addoption("--shard", metavar="I/N",
                    help="run only shard I of N (1-based; tests split by a stable hash of their node id), e.g. "
                         "for a CI matrix whose run files merge into one report (default: every test)")


def parse_shard(text: str) -> tuple[int, int]:
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit() and 1 <= int(index) <= int(count)):
        raise ValueError(f"bad --shard {text!r}: expected I/N with 1 <= I <= N, e.g. 1/4")
    return int(index), int(count)


def xdist_worker(config: pytest.Config) -> str | None:
    """This process's pytest-xdist worker id (gw0, gw1, ...), or None outside xdist."""
    return getattr(config, "workerinput", {}).get("workerid")


def open_run(config: pytest.Config, options: dict[str, object]) -> RunWriter:
    """This process's run file writer; a results directory that cannot take files is a usage error now, not after
    the run."""
    given = config.getoption("results_dir")
    if given is not None and not given.strip():
        raise ValueError("--results-dir is empty: name a directory")
    scratch = os.environ.get(RESULTS_DIR_ENV) or config.rootpath / SCRATCH_RESULTS_DIR
    results_dir = Path(given) if given is not None else Path(scratch)
    # absolute: the run file is opened at the first record, and a test may have changed directory by then (pytester)
    records_dir = results_dir.absolute() / "records"
    try:
        check_writable_dir(records_dir)
    except OSError as error:
        raise ValueError(f"--results-dir {results_dir}: cannot write records there ({error.strerror or error})") from None
    worker = xdist_worker(config)
    group = getattr(config, "workerinput", {}).get("testrunuid")
    return RunWriter(records_dir, new_run_id(worker, group), run_header(options))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "exactness: deterministic checks that an optimization changes nothing it must not")
    config.addinivalue_line("markers", "bench: timed or memory measurements, recorded and tabulated")
    config.addinivalue_line("markers", "faults: a planted fault run against the suite meant to catch it (tests/faults/)")
    config.addinivalue_line("markers", "config_matrix: the built-in configuration matrix (every position encoding x "
                                       "MHA/GQA/MQA on small random models) rather than the --model checkpoint")
    try:
        backends = config.getoption("backend") or DEFAULT_BACKENDS
        for name in backends:
            get_backend(name)
        quants = [parse_quant(q) for q in config.getoption("quant")] if config.getoption("quant") else None
        attentions = ([parse_attention(a) for a in config.getoption("attention")]
                      if config.getoption("attention") else None)
        batchings = ([parse_batching(b) for b in config.getoption("batching")]
                     if config.getoption("batching") else None)
        model_name = config.getoption("model")
        if model_name is not None and not model_name.strip():
            raise ValueError(f"--model is empty: name a built-in model or a local directory (default: {DEFAULT_MODEL})")
        model = resolve_model(model_name or DEFAULT_MODEL)
        shard = parse_shard(config.getoption("shard")) if config.getoption("shard") else None
        slo = parse_slo(config.getoption("slo")) if config.getoption("slo") else dict(DEFAULT_SLO)
        burstiness = (parse_burstiness(config.getoption("burstiness")) if config.getoption("burstiness") is not None
                      else DEFAULT_BURSTINESS)
        options = {"backends": backends, "model": model.name, "quant": config.getoption("quant"),
                   "attention": config.getoption("attention"),
                   "batching": config.getoption("batching"), "shard": config.getoption("shard"),
                   "slo": slo_label(slo), "burstiness": burstiness,
                   "markers": config.getoption("markexpr") or None, "worker": xdist_worker(config)}
        writer = open_run(config, options)
    except (ValueError, CheckpointError) as error:
        raise pytest.UsageError(str(error)) from None
    config.stash[SESSION] = HarnessSession(list(dict.fromkeys(backends)), quants, attentions, model, writer, shard,
                                           batchings, slo, burstiness)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """--shard I/N keeps the tests whose node id hashes to shard I (stable across machines and runs)."""
    shard = config.stash[SESSION].shard
    if shard is None:
        return
    index, count = shard
    keep = [item for item in items if zlib.crc32(item.nodeid.encode()) % count == index - 1]
    dropped = [item for item in items if zlib.crc32(item.nodeid.encode()) % count != index - 1]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = keep


def pytest_report_header(config: pytest.Config) -> list[str]:
    session = config.stash[SESSION]
    return [f"exactbench: backends {', '.join(session.backends)} (available: {', '.join(available())}); "
            f"model {session.model.name}; machine {machine_info()['id']}",
            f"exactbench: records to {session.writer.path}"
            + (f"; shard {session.shard[0]}/{session.shard[1]}" if session.shard else "")]


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
def slo(request: pytest.FixtureRequest) -> dict[str, float]:
    """The --slo objectives, {ttft|tpot|e2el: milliseconds}: what serving goodput counts."""
    return request.config.stash[SESSION].slo


@pytest.fixture
def burstiness(request: pytest.FixtureRequest) -> float:
    """The --burstiness of serving benchmarks' gamma arrivals (1: Poisson)."""
    return request.config.stash[SESSION].burstiness


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
    """What a test attaches to its record: metrics, their repeats, extra parameters, the model/strategy it loaded."""

    __test__ = False  # not a test class

    def __init__(self, tier: str, model: str):
        self.tier = tier
        self.model = model
        self.strategy: dict[str, str] = {}
        self.metrics: dict[str, float] = {}
        self.extra_params: dict[str, object] = {}
        self.repeats: dict[str, list[float]] = {}

    def __call__(self, **metrics: float) -> None:
        self.metrics.update({name: float(value) for name, value in metrics.items()})

    def samples(self, **repeats: list[float]) -> None:
        """The repeated measurements behind a metric (e.g. the per-round ratios whose median it is): the gate
        tests a change against their spread."""
        self.repeats.update({name: [float(v) for v in values] for name, values in repeats.items()})

    def params(self, **params: object) -> None:
        self.extra_params.update(params)


@pytest.fixture
def record(request: pytest.FixtureRequest) -> TestRecord:
    """record(**metrics) attaches numbers to this test's record; record.params(**p) adds parameters."""
    return request.node.stash[TEST_RECORD]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    tiers = [marker for marker in RECORDED_MARKERS if item.get_closest_marker(marker)]
    if "bench" in tiers and xdist_worker(item.config):
        # not recorded: the skip says nothing about the backend
        pytest.skip("bench tests do not run under pytest-xdist (parallel timings are meaningless); run them without -n")
    if tiers:
        item.stash[TEST_RECORD] = TestRecord(tiers[0], item.config.stash[SESSION].model.name)
    # Exactness checks run tiny models, where one thread is fastest and immune to a busy machine;
    # measurements use every thread, as a user would.
    torch.set_num_threads(1 if "bench" not in tiers else item.config.stash[SESSION].threads)


def _plain(value: object) -> object:
    return value if isinstance(value, (int, float, bool, str)) or value is None else str(value)


# Exceptions that say the environment failed (a file, a permission, the disk, memory), not the backend: recorded
# as `error`, which never replaces an earlier decisive record.
ENVIRONMENT_ERRORS = (OSError, MemoryError)


def _outcome(report: pytest.TestReport, call: pytest.CallInfo) -> tuple[str, str | None]:
    if hasattr(report, "wasxfail"):
        return ("xfailed" if report.skipped else "xpassed"), report.wasxfail or None
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        return "skipped", reason.removeprefix("Skipped: ")
    if report.failed and call.excinfo is not None and call.excinfo.errisinstance(ENVIRONMENT_ERRORS):
        return "error", call.excinfo.exconly().splitlines()[0]
    return report.outcome, None


def _benchmark_stats(item: pytest.Item):
    bench = getattr(item, "funcargs", {}).get("benchmark")
    stats = getattr(getattr(bench, "stats", None), "stats", None)
    return stats if stats is not None and getattr(stats, "data", None) else None


def _benchmark_metrics(item: pytest.Item) -> dict[str, float]:
    stats = _benchmark_stats(item)
    if stats is None:
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
    outcome, reason = _outcome(report, call)
    callspec = getattr(item, "callspec", None)
    params = {k: _plain(v) for k, v in (callspec.params if callspec else {}).items()}
    backend = params.pop("backend", None)
    strategy = test_record.strategy or {k: params[k] for k in STRATEGY_FIXTURES if k in params}
    for kind in STRATEGY_FIXTURES:
        params.pop(kind, None)
    params.update({k: _plain(v) for k, v in test_record.extra_params.items()})
    stats = _benchmark_stats(item)
    samples = {"time_s": list(stats.data)} if stats is not None else {}
    item.config.stash[SESSION].writer.append(Record(
        suite=item.module.__name__.rsplit(".", 1)[-1].removeprefix("test_"), tier=test_record.tier,
        test=item.nodeid, backend=backend, model=test_record.model, strategy=strategy, params=params,
        outcome=outcome, metrics={**test_record.metrics, **_benchmark_metrics(item)}, reason=reason,
        machine=machine_info(), commit=current_commit(), time=datetime.now(timezone.utc).isoformat(timespec="microseconds"),
        samples={**samples, **test_record.repeats},
    ))
    return report


def pytest_sessionfinish(session: pytest.Session) -> None:
    harness = session.config.stash.get(SESSION, None)
    if harness is None:
        return
    harness.writer.close()
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and harness.writer.count:
        reporter.write_line(f"exactbench: {harness.writer.count} records in {harness.writer.path}")
