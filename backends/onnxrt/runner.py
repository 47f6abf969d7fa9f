"""ONNX Runtime sessions over the decoder-step contract of graph.py: validation, the in-place KV cache, the runner.

The cache keeps one preallocated OrtValue per layer and kind, (B, Hkv, capacity, D), zero-filled once. Each
forward binds it with IO binding as both the past input and the present output, so ONNX Runtime scatters the
new keys and values into it in place: per step, no part of the cache is copied or read back into Python. The
slot bookkeeping (which slots are valid, the position each holds, each row's length) follows
backends/torch_ref/model.TorchKVCache, so the two backends honour the same cache semantics (base.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from backends.base import CacheFullError, KVCache, ModelRunner, PackedStepRunner
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


def open_session(path: Path, config: ModelConfig) -> ort.InferenceSession:
    """A session for `path`, checked against the decoder-step contract for `config`."""
    try:
        session = ort.InferenceSession(str(path), providers=execution_providers())
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


class OrtKVCache(KVCache):
    """Per-layer keys and values as OrtValues (B, Hkv, capacity, D), plus each slot's validity and position."""

    def __init__(self, owner: OrtRunner, values: list[ort.OrtValue], batch_size: int, capacity: int):
        self.owner = owner
        self.values = values  # in graph order: layer 0 key, layer 0 value, layer 1 key, ...
        self._capacity = capacity
        self.valid = torch.zeros(batch_size, capacity, dtype=torch.bool)
        self.positions = torch.zeros(batch_size, capacity, dtype=torch.long)
        self._lengths = torch.zeros(batch_size, dtype=torch.long)
        self.bindings: dict[tuple[int, int], ort.IOBinding] = {}  # (first row, rows): OrtRunner._cache_binding

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


def row_runs(counts: list[int]) -> list[tuple[int, int, int]]:
    """(first row, number of rows, tokens per row) of each maximal range of consecutive rows with the same
    non-zero token count."""
    runs: list[tuple[int, int, int]] = []
    for row, count in enumerate(counts):
        if count and runs and runs[-1][2] == count and runs[-1][0] + runs[-1][1] == row:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1, count)
        elif count:
            runs.append((row, 1, count))
    return runs


class OrtRunner(ModelRunner, PackedStepRunner):
    """One ONNX model file (a strategy of one checkpoint) in an onnxruntime session."""

    def __init__(self, checkpoint: Checkpoint, strategy: Strategy, path: Path):
        super().__init__(checkpoint, strategy)
        self.path = path
        self.session = open_session(path, checkpoint.config)
        self.device = "cuda" if "CUDAExecutionProvider" in self.session.get_providers() else "cpu"
        past = {i.name: i for i in self.session.get_inputs()}
        self.past_names = layer_names(self.config, "past_key_values")
        self.present_names = layer_names(self.config, "present")
        self.cache_dtype = ELEMENT_TYPES[past[self.past_names[0]].type]
        self.feed_names = input_names(self.config)[: -len(self.past_names)]  # the inputs bound anew each step

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
        mask = torch.ones_like(tokens, dtype=torch.bool) if token_mask is None else token_mask.cpu().bool()
        if not (tokens.dim() == 2 and tokens.shape[0] == cache.lengths.shape[0]
                and tokens.shape == positions.shape == mask.shape):
            raise ValueError(f"tokens {tuple(tokens.shape)}, positions {tuple(positions.shape)} and token_mask "
                             f"{tuple(mask.shape)} must all be (batch={cache.lengths.shape[0]}, T)")
        tokens, positions = tokens.cpu().long(), positions.cpu().long()
        self._check_vocabulary(tokens)
        cache.check_room(tokens.shape[1])
        return self._run(cache, 0, tokens, positions, mask)

    def forward_packed(self, cache, tokens, positions, rows):
        """Rows are run in groups with no padding: each maximal range of consecutive rows that bring the same
        number of tokens is one session run, its slice of the cache bound in place by address (rows are the
        cache's outermost axis, so a range of rows is one contiguous block of memory)."""
        self._check_cache(cache)
        tokens, positions, rows = tokens.cpu().long(), positions.cpu().long(), rows.cpu().long()
        self._check_vocabulary(tokens)
        counts = torch.bincount(rows, minlength=cache.lengths.shape[0])
        full = cache.lengths + counts > cache.capacity
        if bool(full.any()):
            row = int(full.nonzero()[0])
            raise CacheFullError(f"KV cache full: row {row} holds {int(cache.lengths[row])} of {cache.capacity} "
                                 f"slots and {int(counts[row])} more tokens were given")
        order = torch.argsort(rows, stable=True)  # by row, each row's tokens in their order
        logits = torch.empty(len(rows), self.config.vocab_size)
        start = 0
        for first, n_rows, count in row_runs(counts.tolist()):
            picked = order[start: start + n_rows * count]
            shape = (n_rows, count)
            logits[picked] = self._run(cache, first, tokens[picked].view(shape), positions[picked].view(shape),
                                       torch.ones(shape, dtype=torch.bool)).flatten(0, 1)
            start += n_rows * count
        return logits

    def _check_cache(self, cache) -> None:
        if not isinstance(cache, OrtKVCache) or cache.owner is not self:
            raise TypeError(f"cache of type {type(cache).__name__} was not made by this runner")

    def _check_vocabulary(self, tokens: torch.Tensor) -> None:
        ids = tokens.numpy()
        if ids.size and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            bad = ids[(ids < 0) | (ids >= self.config.vocab_size)][0]
            raise ValueError(f"token id {int(bad)} is outside the vocabulary: accepted [0, {self.config.vocab_size})")

    def _run(self, cache: OrtKVCache, first: int, tokens, positions, mask) -> torch.Tensor:
        """Run (b, T) tokens on cache rows first .. first + b - 1, whose slots have room; (b, T, V) logits.

        The bookkeeping runs on numpy views of the cache's tensors: on arrays this small numpy's indexing costs a
        microsecond where torch's costs ten, and a decode step's Python time is a visible part of its time."""
        n_rows, n_new = tokens.shape
        picked = slice(first, first + n_rows)
        valid, held, start = cache.valid.numpy(), cache.positions.numpy(), cache.lengths.numpy()[picked]
        # the slots this call fills, as TorchKVCache.begin; the lengths advance only once the run succeeds
        slots = start[:, None] + np.arange(n_new)  # (b, T)
        rows = np.arange(first, first + n_rows)[:, None]
        valid[rows, slots] = mask.numpy()
        held[rows, slots] = positions.numpy()
        lengths = start + n_new
        seen = int(lengths.max()) if lengths.size else 0

        binding = self._cache_binding(cache, first, n_rows)
        feeds = {"input_ids": tokens.numpy(), "position_ids": positions.numpy(), "cache_position": slots,
                 "attention_mask": valid[picked, :seen], "key_position_ids": held[picked, :seen]}
        for name in self.feed_names:
            binding.bind_cpu_input(name, np.ascontiguousarray(feeds[name]))
        logits = torch.empty(n_rows, n_new, self.config.vocab_size)  # written by the session: no copy out
        binding.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.data_ptr())
        try:
            self.session.run_with_iobinding(binding)
        except BaseException:
            valid[rows, slots] = False  # slots past a row's length are invalid, as truncate leaves them
            raise
        cache._lengths[picked] = torch.from_numpy(lengths)
        return logits

    def _cache_binding(self, cache: OrtKVCache, first: int, n_rows: int) -> ort.IOBinding:
        """An IO binding with rows first .. first + n_rows - 1 of the cache bound as both past and present, so the
        session writes the new keys and values in place; made once per row range and reused by every step (binding
        the cache is most of a decode step's Python time)."""
        key = (first, n_rows)
        if key in cache.bindings:
            return cache.bindings[key]
        binding = self.session.io_binding()
        for past, present, value in zip(self.past_names, self.present_names, cache.values):
            if n_rows == cache.lengths.shape[0]:
                binding.bind_ortvalue_input(past, value)
                binding.bind_ortvalue_output(present, value)  # in place: present is past with the new slots written
            else:  # the rows' slice of the buffer, bound by address: still in place
                shape = [n_rows, *value.shape()[1:]]
                address = value.data_ptr() + first * int(np.prod(shape[1:])) * np.dtype(self.cache_dtype).itemsize
                binding.bind_input(past, value.device_name(), 0, self.cache_dtype, shape, address)
                binding.bind_output(present, value.device_name(), 0, self.cache_dtype, shape, address)
        cache.bindings[key] = binding
        return binding

    def forward_full(self, tokens, positions, token_mask=None):
        """Every token at once into an empty cache of exactly that size: the same graph with no past."""
        return self.forward(self.new_cache(tokens.shape[0], tokens.shape[1]), tokens, positions, token_mask)
