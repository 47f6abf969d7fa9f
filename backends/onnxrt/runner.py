"""ONNX Runtime sessions over the decoder-step contract of graph.py: validation, the in-place KV cache, the runner.

The cache keeps one preallocated OrtValue per layer and kind, (B, Hkv, capacity, D), zero-filled once. Each
forward binds it with IO binding as both the past input and the present output, so ONNX Runtime scatters the
new keys and values into it in place: per step, no part of the cache is copied or read back into Python. The
slot bookkeeping (which slots are valid, the position each holds, each row's length) follows
backends/torch_ref/model.TorchKVCache, so the two backends honour the same cache semantics (base.py).

`forward_packed` (continuous batching) runs the same step graph once per range of rows, bound by address; the paged
strategies run the paged graph (paged.py), opened on first use.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from backends.base import CacheFullError, KVCache, ModelRunner, PackedStepRunner, PagedKVCache, PagedRunner
from backends.checkpoint import Checkpoint, ModelConfig
from backends.strategies import Strategy

from .graph import CONFIG_METADATA, GRAPH_METADATA, input_names, layer_names, output_names

ELEMENT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class OnnxModelError(ValueError):
    """An .onnx file that cannot serve as this model's decoder step; the message names the file and the problem."""


def execution_providers() -> list[str]:
    """CUDA where onnxruntime has it, else the CPU."""
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def intra_op_threads() -> int:
    """onnxruntime-genai's rule for its sessions (src/models/model.cpp): half the hardware threads, 1 to 16. ONNX
    Runtime's own default (every physical core, spinning) lost half the decode speed on a shared 2-core machine."""
    return min(16, max(1, (os.cpu_count() or 1) // 2))


def session_options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads()
    return options


def open_session(path: Path, config: ModelConfig) -> ort.InferenceSession:
    """A session for `path`, checked against the decoder-step contract for `config`."""
    try:
        session = ort.InferenceSession(str(path), session_options(), providers=execution_providers())
    except Exception as error:  # onnxruntime's pybind errors (InvalidProtobuf, Fail, NoSuchFile) share no base
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise OnnxModelError(f"{path}: not a loadable ONNX model ({reason})") from None
    check_contract(session, config, path)
    return session


def check_contract(session: ort.InferenceSession, config: ModelConfig, path: Path) -> None:
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    missing = [n for n in input_names(config) if n not in inputs] + [n for n in output_names(config) if n not in outputs]
    unexpected = [n for n in inputs if n not in input_names(config)] + [n for n in outputs if n not in output_names(config)]
    if missing or unexpected:
        raise OnnxModelError(f"{path}: not an exactbench decoder step for this model: missing {missing[:4]}, "
                             f"unexpected {unexpected[:4]} (expected inputs {', '.join(input_names(config)[:5])}, ...)")
    kv_shape = [config.n_kv_heads, config.head_dim]
    for name in layer_names(config, "past_key_values"):
        shape = inputs[name].shape
        if len(shape) != 4 or shape[1::2] != kv_shape or inputs[name].type not in ELEMENT_TYPES:
            raise OnnxModelError(f"{path}: {name} is {inputs[name].type} of shape {shape}; this model needs float "
                                 f"(batch, {config.n_kv_heads}, capacity, {config.head_dim})")
    if outputs["logits"].shape[-1] != config.vocab_size:
        raise OnnxModelError(f"{path}: logits have {outputs['logits'].shape[-1]} columns; the model's vocabulary "
                             f"is {config.vocab_size}")
    exported = session.get_modelmeta().custom_metadata_map.get(CONFIG_METADATA)
    if exported is None:  # a file exported elsewhere: the names and shapes above are all there is to check
        return
    try:
        same = ModelConfig.from_dict(json.loads(exported)) == config
    except (TypeError, ValueError) as error:
        raise OnnxModelError(f"{path}: unreadable {CONFIG_METADATA} metadata ({error})") from None
    if not same:
        raise OnnxModelError(f"{path}: exported from another model configuration ({exported})")


def open_variant(checkpoint: Checkpoint, strategy: Strategy, graph: str, inputs: list[str],
                 outputs: list[str]) -> ort.InferenceSession:
    """A session of graph variant `graph` (store.GRAPHS) of the checkpoint under the strategy, with those names."""
    from .store import model_file

    path = model_file(checkpoint, strategy.quant, graph=graph).path
    try:
        session = ort.InferenceSession(str(path), session_options(), providers=execution_providers())
    except Exception as error:  # onnxruntime's pybind errors share no base
        raise OnnxModelError(f"{path}: not a loadable ONNX model ({str(error).strip()[:200]})") from None
    names = [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]
    if names != (inputs, outputs):
        raise OnnxModelError(f"{path}: not an exactbench {graph} decoder step for this model (inputs {names[0][:6]})")
    return session


def run_in_place(session: ort.InferenceSession, feeds: dict[str, np.ndarray | torch.Tensor],
                 caches: list[tuple[str, str, ort.OrtValue]], bindings: dict, logits_shape: tuple[int, ...],
                 rows: range | None = None) -> torch.Tensor:
    """Run `session` on CPU `feeds` (every input it has that is not a cache) and its caches, each (input name,
    output name, buffer) bound as both input and output: the graph's present is its past with the new slots
    written, so the update is in place. `rows`: only that range of the buffers' outermost axis (all of it when
    None), bound by address: a range of rows is one contiguous block of memory. The caches are bound once per
    session and range and kept in `bindings` (the cache's own dict), then reused every step: binding them is most
    of a decode step's Python time. Returns the logits, written by the session straight into the returned tensor."""
    rows = range(caches[0][2].shape()[0]) if rows is None else rows
    if (session, rows) not in bindings:
        binding = session.io_binding()
        for past, present, value in caches:
            shape = [len(rows), *value.shape()[1:]]
            dtype = ELEMENT_TYPES[value.data_type()]
            address = value.data_ptr() + rows.start * int(np.prod(shape[1:])) * np.dtype(dtype).itemsize
            binding.bind_input(past, value.device_name(), 0, dtype, shape, address)
            binding.bind_output(present, value.device_name(), 0, dtype, shape, address)
        cache_inputs = {name for name, _, _ in caches}
        bindings[session, rows] = binding, [i.name for i in session.get_inputs() if i.name not in cache_inputs]
    binding, feed_names = bindings[session, rows]
    arrays = [np.ascontiguousarray(feeds[name].numpy() if isinstance(feeds[name], torch.Tensor) else feeds[name])
              for name in feed_names]  # held until the run: a binding may point into them
    for name, array in zip(feed_names, arrays):
        binding.bind_cpu_input(name, array)
    logits = torch.empty(logits_shape)
    binding.bind_output("logits", "cpu", 0, np.float32, list(logits_shape), logits.data_ptr())
    session.run_with_iobinding(binding)
    return logits


def row_runs(counts: list[int], room: list[bool]) -> list[tuple[range, int]]:
    """The session runs of a packed step, each (rows, tokens per row): every maximal range of consecutive rows with
    the same non-zero token count; and single-token (decode) ranges joined across the rows between them where each
    of those has `room` for one masked token: one run with a few idle rows costs less than one more run."""
    runs: list[tuple[range, int]] = []
    decode = None  # the index of the latest single-token run, which a later decode row may join
    for row, count in enumerate(counts):
        if not count:
            continue
        if count == 1 and decode is not None and all(room[runs[decode][0].stop: row]):
            runs[decode] = (range(runs[decode][0].start, row + 1), 1)
            continue
        if runs and runs[-1][1] == count and runs[-1][0].stop == row:
            runs[-1] = (range(runs[-1][0].start, row + 1), count)
        else:
            runs.append((range(row, row + 1), count))
        if count == 1:
            decode = len(runs) - 1
    return runs


class OrtKVCache(KVCache):
    """Per-layer keys and values as OrtValues (B, Hkv, capacity, D), plus each slot's validity and position."""

    def __init__(self, owner: OrtRunner, values: list[ort.OrtValue], batch_size: int, capacity: int):
        self.owner = owner
        self.values = values  # in graph order: layer 0 key, layer 0 value, layer 1 key, ...
        self._capacity = capacity
        self.valid = torch.zeros(batch_size, capacity, dtype=torch.bool)
        self.positions = torch.zeros(batch_size, capacity, dtype=torch.long)
        self._lengths = torch.zeros(batch_size, dtype=torch.long)
        # the same memory as numpy arrays, for the runner's per-step bookkeeping (OrtRunner._run)
        self.valid_array, self.positions_array = self.valid.numpy(), self.positions.numpy()
        self.bindings: dict = {}  # (session, rows) -> (a binding of those rows, the other inputs): run_in_place

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def lengths(self) -> torch.Tensor:
        return self._lengths

    @property
    def element_bytes(self) -> int:
        return np.dtype(self.owner.cache_dtype).itemsize

    @property
    def allocated_bytes(self) -> int:
        return sum(int(np.prod(value.shape())) for value in self.values) * self.element_bytes

    def truncate(self, lengths: torch.Tensor) -> None:
        lengths = lengths.to(self._lengths)
        if bool((lengths > self._lengths).any()) or bool((lengths < 0).any()):
            raise ValueError(f"truncate can only shorten rows: {self._lengths.tolist()} -> {lengths.tolist()}")
        self.valid &= torch.arange(self.capacity)[None, :] < lengths[:, None]
        self._lengths = lengths.clone()

    def reset(self, rows: torch.Tensor) -> None:
        rows = rows.cpu()
        self.valid[rows] = False
        self._lengths[rows] = 0


class OrtRunner(ModelRunner, PackedStepRunner, PagedRunner):
    """One ONNX model file (a strategy of one checkpoint) in an onnxruntime session; the paged graph's session
    (paged.py) is opened on the first paged cache."""

    def __init__(self, checkpoint: Checkpoint, strategy: Strategy, path: Path):
        super().__init__(checkpoint, strategy)
        self.path = path
        self.session = open_session(path, checkpoint.config)
        self.device = "cuda" if "CUDAExecutionProvider" in self.session.get_providers() else "cpu"
        past = {i.name: i for i in self.session.get_inputs()}
        self.past_names = layer_names(self.config, "past_key_values")
        self.present_names = layer_names(self.config, "present")
        self.cache_dtype = ELEMENT_TYPES[past[self.past_names[0]].type]
        self.paged = None

    @property
    def implementation(self) -> str:
        from .quantize import IMPLEMENTATION

        graph = self.session.get_modelmeta().custom_metadata_map.get(GRAPH_METADATA)  # store.graph_kind's choice
        return IMPLEMENTATION[self.strategy.quant] + (f", {graph} graph" if graph else "")

    def new_cache(self, batch_size: int, capacity: int) -> OrtKVCache:
        cfg = self.config
        shape = (batch_size, cfg.n_kv_heads, capacity, cfg.head_dim)
        # zero-filled once: a never-written slot is masked, but 0 x NaN would still reach the output. np.full
        # writes every page now (np.zeros would leave the kernel to zero them inside the first forward).
        values = [ort.OrtValue.ortvalue_from_numpy(np.full(shape, 0, self.cache_dtype), self.device, 0)
                  for _ in self.past_names]
        return OrtKVCache(self, values, batch_size, capacity)

    def forward(self, cache, tokens, positions, token_mask=None):
        self._check_cache(cache)
        mask = None if token_mask is None else token_mask.cpu().bool()  # None: every token is real
        if not (tokens.dim() == 2 and tokens.shape[0] == cache.valid.shape[0]
                and tokens.shape == positions.shape == (tokens.shape if mask is None else mask.shape)):
            raise ValueError(f"tokens {tuple(tokens.shape)}, positions {tuple(positions.shape)} and token_mask "
                             f"{tuple((tokens if mask is None else mask).shape)} must all be "
                             f"(batch={cache.valid.shape[0]}, T)")
        tokens, positions = tokens.cpu().long(), positions.cpu().long()
        self._check_vocabulary(tokens)
        return self._run(cache, tokens, positions, mask)

    def forward_packed(self, cache, tokens, positions, rows):
        """Rows run in groups with no padding: each maximal range of consecutive rows that bring the same number of
        tokens is one run of the step graph (the fused graph where store.graph_kind chooses it) over that range of
        the cache, bound in place by address, and decode rows share one run across the rows between them
        (row_runs). A prefill chunk is one row's run, the step's decode tokens one run: each token goes through
        the same kernels as when its request runs alone.

        The bookkeeping is numpy's: torch's threads, woken for a copy of the logits, wait for cores that
        onnxruntime's threads still spin on after a run (the step took several times longer)."""
        self._check_cache(cache)
        tokens, positions, rows = (x.cpu().long().numpy() for x in (tokens, positions, rows))
        self._check_vocabulary(torch.from_numpy(tokens))
        lengths = cache.lengths.numpy()
        counts = np.bincount(rows, minlength=len(lengths))
        full = lengths + counts > cache.capacity
        if full.any():
            row = int(full.nonzero()[0][0])
            raise CacheFullError(f"KV cache full: row {row} holds {int(lengths[row])} of {cache.capacity} "
                                 f"slots and {int(counts[row])} more tokens were given")
        order = np.argsort(rows, kind="stable")  # by row, each row's tokens in their order
        first = np.cumsum(counts) - counts  # where each row's tokens start in `order`
        logits = np.empty((len(rows), self.config.vocab_size), np.float32)
        for run, count in row_runs(counts.tolist(), (lengths + counts < cache.capacity).tolist()):
            span = np.arange(run.start, run.stop)
            takes = counts[span] == count  # the rows that bring this run's tokens; the others ride along masked
            index = order[np.minimum(first[span, None] + np.arange(count), len(rows) - 1)]  # (b, T)
            mask = np.repeat(takes[:, None], count, axis=1)
            out = self._run(cache, torch.from_numpy(np.where(mask, tokens[index], 0)),
                            torch.from_numpy(np.where(mask, positions[index], 0)), torch.from_numpy(mask), run)
            logits[index[takes]] = out.numpy()[takes]
            cache.lengths.numpy()[span[~takes]] -= count  # a rider's masked token is left invalid past its length
        return torch.from_numpy(logits)

    def paged_session(self):
        """The session of the paged graph (paged.py), opened on first use."""
        from .paged import PagedSession

        if self.paged is None:
            self.paged = PagedSession(self.checkpoint, self.strategy)
        return self.paged

    def new_paged_cache(self, n_blocks: int, block_size: int, fill: float = 0.0) -> PagedKVCache:
        return self.paged_cache_class(self.paged_session(), n_blocks, block_size, fill)

    @property
    def paged_cache_class(self):
        from .paged import OrtPagedKVCache

        return OrtPagedKVCache

    def forward_paged(self, cache, tokens, positions, seqs, block_tables, context_lens):
        self._check_vocabulary(tokens.cpu())
        return self.paged_session().run(cache, tokens, positions, seqs, block_tables, context_lens)

    def cache_bindings(self, cache: OrtKVCache) -> list[tuple[str, str, ort.OrtValue]]:
        return list(zip(self.past_names, self.present_names, cache.values))

    def _check_cache(self, cache) -> None:
        if not isinstance(cache, OrtKVCache) or cache.owner is not self:
            raise TypeError(f"cache of type {type(cache).__name__} was not made by this runner")

    def _check_vocabulary(self, tokens: torch.Tensor) -> None:
        ids = tokens.numpy()
        # one reduction, not two: a negative id cast to unsigned is larger than any vocabulary
        if ids.size and ids.astype(np.uint64).max() >= self.config.vocab_size:
            bad = ids[(ids < 0) | (ids >= self.config.vocab_size)][0]
            raise ValueError(f"token id {int(bad)} is outside the vocabulary: accepted [0, {self.config.vocab_size})")

    def _run(self, cache: OrtKVCache, tokens, positions, mask, rows: range | None = None) -> torch.Tensor:
        """Run (b, T) tokens on cache rows `rows` (every row when None), whose slots have room; (b, T, V) logits.

        The bookkeeping runs on numpy views of the cache's tensors: on arrays this small a numpy call costs a
        microsecond or two where torch's costs several, and at batch 1 a decode step's Python time was a tenth of
        onnxruntime-genai's whole step (int4)."""
        n_rows, n_new = tokens.shape
        picked = slice(None) if rows is None else slice(rows.start, rows.stop)
        valid, held = cache.valid_array[picked], cache.positions_array[picked]
        start = cache.lengths.numpy()[picked]
        lengths = start + n_new
        seen = int(lengths.max()) if n_rows else 0
        if seen > cache.capacity:
            cache.check_room(n_new)  # raises CacheFullError, before any slot is written
        # the slots this call fills, as TorchKVCache.begin; the lengths advance only once the run succeeds
        slots = start[:, None] + np.arange(n_new)  # (b, T)
        index = np.arange(n_rows)[:, None]
        valid[index, slots] = True if mask is None else mask.numpy()
        held[index, slots] = positions.numpy()
        feeds = {"input_ids": tokens.numpy(), "position_ids": positions.numpy(), "cache_position": slots,
                 "attention_mask": valid[:, :seen], "key_position_ids": held[:, :seen]}
        try:
            logits = run_in_place(self.session, feeds, self.cache_bindings(cache), cache.bindings,
                                  (n_rows, n_new, self.config.vocab_size), rows)
        except BaseException:
            valid[index, slots] = False  # slots past a row's length are invalid, as truncate leaves them
            raise
        updated = cache.lengths.clone()
        updated[picked] = torch.from_numpy(lengths)
        cache._lengths = updated
        return logits

    def forward_full(self, tokens, positions, token_mask=None):
        """Every token at once into an empty cache of exactly that size: the same graph with no past."""
        return self.forward(self.new_cache(tokens.shape[0], tokens.shape[1]), tokens, positions, token_mask)
