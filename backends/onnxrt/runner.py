"""ONNX Runtime sessions over the decoder-step contract of graph.py: validation, the in-place KV cache, the runner.

The cache keeps one preallocated OrtValue per layer and kind, (B, Hkv, capacity, D), zero-filled once. Each
forward binds it with IO binding as both the past input and the present output, so ONNX Runtime scatters the
new keys and values into it in place: per step, no part of the cache is copied or read back into Python. The
slot bookkeeping (which slots are valid, the position each holds, each row's length) follows
backends/torch_ref/model.TorchKVCache, so the two backends honour the same cache semantics (base.py).

Two more graph variants are opened on first use: `forward_packed` runs the packed graph (packed_graph.py) over the
same cache, one session run per continuous-batching step; the paged strategies run the paged graph (paged.py).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from backends.base import CacheFullError, KVCache, ModelRunner, PackedStepRunner, PagedKVCache, PagedRunner, rank_within
from backends.checkpoint import Checkpoint, ModelConfig
from backends.strategies import Strategy

from . import packed_graph
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
                 caches: list[tuple[str, str, ort.OrtValue]], bindings: dict, logits_shape: tuple[int, ...]
                 ) -> torch.Tensor:
    """Run `session` on CPU `feeds` (every input it has that is not a cache) and its caches, each (input name,
    output name, buffer) bound as both input and output: the graph's present is its past with the new slots
    written, so the update is in place. The caches are bound once per session and kept in `bindings` (the cache's
    own dict), then reused every step: binding them is most of a decode step's Python time. Returns the logits,
    written by the session straight into the returned tensor."""
    if session not in bindings:
        binding = session.io_binding()
        for past, present, value in caches:
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
        cache_inputs = {name for name, _, _ in caches}
        bindings[session] = binding, [i.name for i in session.get_inputs() if i.name not in cache_inputs]
    binding, feed_names = bindings[session]
    for name in feed_names:  # the binding keeps each array (it reads it in place) until the name is bound again
        feed = feeds[name]
        binding.bind_cpu_input(name, np.ascontiguousarray(feed.numpy() if isinstance(feed, torch.Tensor) else feed))
    logits = torch.empty(logits_shape)
    binding.bind_output("logits", "cpu", 0, np.float32, list(logits_shape), logits.data_ptr())
    session.run_with_iobinding(binding)
    return logits


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
        self.bindings: dict = {}  # session -> (its binding of these buffers, its other inputs): run_in_place

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
        self.packed = None  # the packed graph's session, opened by the first forward_packed
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
        """One run of the packed graph (packed_graph.py): every token its own row of one query, written at its
        cache row's next slot and reading that row, gathered by index; no padding computed or stored."""
        self._check_cache(cache)
        tokens, positions, rows = tokens.cpu().long(), positions.cpu().long(), rows.cpu().long()
        self._check_vocabulary(tokens)
        rank, counts = rank_within(rows, cache.lengths.shape[0])
        lengths = cache.lengths + counts
        full = lengths > cache.capacity
        if bool(full.any()):
            row = int(full.nonzero()[0])
            raise CacheFullError(f"KV cache full: row {row} holds {int(cache.lengths[row])} of {cache.capacity} "
                                 f"slots and {int(counts[row])} more tokens were given")
        if self.packed is None:
            self.packed = open_variant(self.checkpoint, self.strategy, "packed", packed_graph.input_names(self.config),
                                       packed_graph.output_names(self.config))
        # the slots this call fills, as TorchKVCache.begin_packed; the lengths advance only once the run succeeds
        slots = cache.lengths[rows] + rank  # (N,)
        cache.valid[rows, slots] = True
        cache.positions[rows, slots] = positions
        span = int(lengths[rows].max())
        feeds = {"input_ids": tokens[:, None], "position_ids": positions[:, None], "cache_rows": rows[:, None],
                 "cache_position": slots[:, None],
                 "key_allowed": cache.valid[rows, :span] & (torch.arange(span)[None, :] <= slots[:, None]),
                 "key_position_ids": cache.positions[rows, :span]}
        try:
            logits = run_in_place(self.packed, feeds, self.cache_bindings(cache), cache.bindings,
                                  (len(tokens), 1, self.config.vocab_size))
        except BaseException:
            cache.valid[rows, slots] = False  # slots past a row's length are invalid, as truncate leaves them
            raise
        cache._lengths = lengths
        return logits[:, 0]

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
        return list(zip(self.past_names, self.present_names, cache.values))  # the step and packed graphs' names

    def _check_cache(self, cache) -> None:
        if not isinstance(cache, OrtKVCache) or cache.owner is not self:
            raise TypeError(f"cache of type {type(cache).__name__} was not made by this runner")

    def _check_vocabulary(self, tokens: torch.Tensor) -> None:
        ids = tokens.numpy()
        # one reduction, not two: a negative id cast to unsigned is larger than any vocabulary
        if ids.size and ids.astype(np.uint64).max() >= self.config.vocab_size:
            bad = ids[(ids < 0) | (ids >= self.config.vocab_size)][0]
            raise ValueError(f"token id {int(bad)} is outside the vocabulary: accepted [0, {self.config.vocab_size})")

    def _run(self, cache: OrtKVCache, tokens, positions, mask) -> torch.Tensor:
        """Run (B, T) tokens on every cache row (a None mask: every token real); (B, T, V) logits.

        The bookkeeping runs on numpy views of the cache's tensors: on arrays this small a numpy call costs a
        microsecond or two where torch's costs several, and at batch 1 a decode step's Python time was a tenth of
        onnxruntime-genai's whole step (int4)."""
        n_rows, n_new = tokens.shape
        valid, held, start = cache.valid_array, cache.positions_array, cache.lengths.numpy()
        lengths = start + n_new
        seen = int(lengths.max()) if n_rows else 0
        if seen > cache.capacity:
            cache.check_room(n_new)  # raises CacheFullError, before any slot is written
        # the slots this call fills, as TorchKVCache.begin; the lengths advance only once the run succeeds
        slots = start[:, None] + np.arange(n_new)  # (B, T)
        rows = np.arange(n_rows)[:, None]
        valid[rows, slots] = True if mask is None else mask.numpy()
        held[rows, slots] = positions.numpy()
        feeds = {"input_ids": tokens.numpy(), "position_ids": positions.numpy(), "cache_position": slots,
                 "attention_mask": valid[:, :seen], "key_position_ids": held[:, :seen]}
        try:
            logits = run_in_place(self.session, feeds, self.cache_bindings(cache), cache.bindings,
                                  (n_rows, n_new, self.config.vocab_size))
        except BaseException:
            valid[rows, slots] = False  # slots past a row's length are invalid, as truncate leaves them
            raise
        cache._lengths = torch.from_numpy(lengths)
        return logits

    def forward_full(self, tokens, positions, token_mask=None):
        """Every token at once into an empty cache of exactly that size: the same graph with no past."""
        return self.forward(self.new_cache(tokens.shape[0], tokens.shape[1]), tokens, positions, token_mask)
