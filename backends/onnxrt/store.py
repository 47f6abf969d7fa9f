"""The on-disk cache of exported and quantized models, keyed by configuration, weights, strategy and exporter.

Layout: `<root>/onnx/<checkpoint fingerprint>-<strategy>-<exporter key>/` (the exporter key names the graph variant
too: the decoder step of graph.py, or its paged variant of paged_graph.py) holds `model.onnx` and
`manifest.json` (the key it was built for, the file's size and sha256, the build time). The root is
$EXACTBENCH_CACHE, else ~/.cache/exactbench.

An entry is built inside a hidden `.tmp-*` directory and renamed into place in one step, so a build that is
interrupted leaves only a `.tmp-*` directory, which is never read (a later build removes it once it is an hour
old). A hit is trusted only if the manifest names the same key and the file has the recorded size and
sha256; anything else (truncated, replaced, half-copied) is moved aside and rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import onnx
import onnxruntime
import torch

from backends.cache import cache_root
from backends.checkpoint import Checkpoint
from backends.strategies import Quant

from .fused_graph import export_fused_decoder, fused_graph_refusal
from .graph import CONFIG_METADATA, GRAPH_METADATA, export_decoder, stamp
from .paged_graph import export_paged_decoder
from .quantize import derive

MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
TMP_PREFIX = ".tmp-"
STALE_TMP_SECONDS = 3600
FORMAT_VERSION = "2"  # bump whenever a graph's contract or export changes what a file holds (2: paged by sequence)
STEP = "step"
# graph (store.graph_kind) -> (its exporter, its contract for the file's metadata)
GRAPHS = {"general": (export_decoder, "decoder step with an in-place KV cache: see backends/onnxrt/graph.py"),
          "fused": (export_fused_decoder, "decoder step of ONNX Runtime's contrib ops, the contract of graph.py: "
                                          "see backends/onnxrt/fused_graph.py"),
          "paged": (export_paged_decoder, "decoder step over a block pool: see backends/onnxrt/paged_graph.py")}
# strategies only the general graph serves: GroupQueryAttention keeps its cache in the compute dtype, and the GPTQ
# export finds each torch layer's MatMul by its weights, which the fused graph packs (q, k, v in one MatMul)
GENERAL_ONLY = {Quant.FP16_KV, Quant.INT4_GPTQ_BLOCK128}


@dataclass(frozen=True)
class Entry:
    path: Path  # the model file
    built: bool  # False: a cache hit
    seconds: float  # time to build, or to validate a hit


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def entry_name(key: dict[str, str]) -> str:
    """The directory name: readable fields first, then a hash of the whole key."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return f"{key['fingerprint']}-{key['strategy']}-{digest}"


def is_valid(directory: Path, key: dict[str, str]) -> bool:
    model, manifest_file = directory / MODEL_FILE, directory / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_file.read_text())
        return (manifest.get("key") == key and model.stat().st_size == manifest.get("bytes")
                and sha256_of(model) == manifest.get("sha256"))
    except (OSError, ValueError):
        return False


def _discard(directory: Path, root: Path) -> None:
    """Move an entry aside (one atomic step, so no reader sees it half-deleted), then delete it."""
    aside = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}stale-", dir=root))
    try:
        directory.rename(aside / "entry")
    except FileNotFoundError:  # another process discarded it first
        pass
    shutil.rmtree(aside, ignore_errors=True)


def _remove_stale_temporaries(root: Path) -> None:
    cutoff = time.time() - STALE_TMP_SECONDS
    for leftover in root.glob(f"{TMP_PREFIX}*"):
        try:
            if leftover.stat().st_mtime < cutoff:
                shutil.rmtree(leftover, ignore_errors=True)
        except FileNotFoundError:
            pass


def fetch(key: dict[str, str], build: Callable[[Path], None], root: Path | None = None) -> Entry:
    """The model file for `key`, built by `build(path)` unless a valid entry exists."""
    root = (root or cache_root()) / "onnx"
    root.mkdir(parents=True, exist_ok=True)
    final = root / entry_name(key)
    start = time.perf_counter()
    if is_valid(final, key):
        return Entry(final / MODEL_FILE, False, time.perf_counter() - start)
    if final.exists():
        _discard(final, root)
    _remove_stale_temporaries(root)
    staging = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=root))
    try:
        build(staging / MODEL_FILE)
        seconds = time.perf_counter() - start
        manifest = {"key": key, "bytes": (staging / MODEL_FILE).stat().st_size,
                    "sha256": sha256_of(staging / MODEL_FILE), "build_seconds": round(seconds, 3)}
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        try:
            staging.rename(final)
        except OSError:  # another process finished the same entry first: use it if it is sound
            if not is_valid(final, key):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already when the rename succeeded
    return Entry(final / MODEL_FILE, True, seconds)


def graph_kind(checkpoint: Checkpoint, quant: Quant, graph: str = STEP) -> str:
    """The graph that serves `graph`: for the decoder step, 'fused' (fused_graph.py) where its contrib ops express
    the model and strategy exactly, else 'general' (graph.py); any other name is the graph itself."""
    if graph != STEP:
        return graph
    return "general" if quant in GENERAL_ONLY or fused_graph_refusal(checkpoint.config) else "fused"


def model_key(checkpoint: Checkpoint, quant: Quant, graph: str = STEP) -> dict[str, str]:
    """What a model file depends on: configuration and weights (the fingerprint), strategy, graph, and exporter."""
    key = {"fingerprint": checkpoint.fingerprint(), "strategy": quant.value, "format": FORMAT_VERSION,
           "graph": graph_kind(checkpoint, quant, graph),
           "torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    if quant == Quant.INT4_GPTQ_BLOCK128:  # its weights come from torch's GPTQ, versioned on its own
        from backends.torch_ref.quantize import GPTQ_CACHE_VERSION

        key["gptq"] = GPTQ_CACHE_VERSION
    return key


def model_file(checkpoint: Checkpoint, quant: Quant, root: Path | None = None, graph: str = STEP) -> Entry:
    """The .onnx file of `checkpoint` under `quant` in graph `graph` (STEP: the decoder step, in the graph
    graph_kind chooses; or a name in GRAPHS): exported (fp32, and fp16-kv with its cache stored in fp16) or derived
    from the fp32 file of the same graph, then cached."""
    key = model_key(checkpoint, quant, graph)
    export, contract = GRAPHS[key["graph"]]
    metadata = {CONFIG_METADATA: json.dumps(checkpoint.config.to_dict(), sort_keys=True),
                "exactbench.model": checkpoint.name, "exactbench.fingerprint": key["fingerprint"],
                "exactbench.strategy": quant.value, "exactbench.format": FORMAT_VERSION, GRAPH_METADATA: key["graph"],
                "exactbench.contract": contract}
    if quant in (Quant.FP32, Quant.FP16_KV):
        def build(path: Path) -> None:
            if quant == Quant.FP16_KV:  # a general-graph strategy (GENERAL_ONLY)
                export_decoder(checkpoint, path, torch.float16)
            else:
                export(checkpoint, path)
            stamp(path, metadata)
    else:
        source = model_file(checkpoint, Quant.FP32, root, key["graph"]).path

        def build(path: Path) -> None:
            derive(quant, checkpoint, source, path)
            stamp(path, metadata)
    return fetch(key, build, root)
