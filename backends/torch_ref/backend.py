"""The reference backend: the PyTorch model of model.py, in fp32, bf16 or fp16 or a quantized format
(quantize.py), on CUDA where present; single-token decode steps eager or compiled (Execution)."""
from __future__ import annotations

import torch

from backends.base import (Backend, KVCache, ModelRunner, PackedStepRunner, PagedKVCache, PagedRunner,
                           UnsupportedModel)
from backends.checkpoint import Checkpoint, check_weights
from backends.registry import register
from backends.strategies import Attention, Batching, Execution, Quant, Strategy

from .attention import IMPLEMENTATIONS, AttentionFn
from .model import Transformer, TorchKVCache, TorchPagedKVCache, full_sequence_context, fuse_projections
from .quantize import (IMPLEMENTATION, QUANTS, Fp16KVCache, Int8KVCache, fp16_round_trip, int8_round_trip, quantize_model,
                       quantized_linears)

DTYPES = {Quant.FP32: torch.float32, Quant.BF16: torch.bfloat16, Quant.FP16: torch.float16}
KV_CACHES = {Quant.INT8_KV: Int8KVCache, Quant.FP16_KV: Fp16KVCache}
KV_ROUND_TRIPS = {Quant.INT8_KV: int8_round_trip, Quant.FP16_KV: fp16_round_trip}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_model(checkpoint: Checkpoint, attention: Attention | None = None) -> Transformer:
    """An fp32 Transformer holding the checkpoint's weights; a shape or name mismatch names the tensor."""
    check_weights(checkpoint)
    model = Transformer(checkpoint.config, attention)
    model.load_state_dict({k: v.float() for k, v in checkpoint.weights.items()}, strict=False)
    return model.eval()


class TorchRunner(ModelRunner, PackedStepRunner, PagedRunner):
    def __init__(self, checkpoint: Checkpoint, strategy: Strategy, device: torch.device):
        compiled = strategy.execution == Execution.COMPILED
        if compiled and (strategy.quant not in DTYPES or strategy.attention == Attention.FLASH):
            # quantized kernels, quantized KV caches and flash's data-dependent tile skipping do not trace whole
            raise UnsupportedModel(f"execution compiled runs quant {', '.join(q.value for q in DTYPES)} with attention "
                                   f"naive or sdpa, not {strategy.id}")
        super().__init__(checkpoint, strategy)
        self.device = device
        self.dtype = DTYPES.get(strategy.quant, torch.float32)  # quantized formats compute in fp32
        self.model = build_model(checkpoint, strategy.attention).to(device, self.dtype)
        quantize_model(self.model, strategy.quant, checkpoint)
        fuse_projections(self.model)
        self.kv_round_trip = KV_ROUND_TRIPS.get(strategy.quant)  # a quantized KV cache: what it keeps of K/V
        self.decode_step = self.compiled_decode_step() if compiled else None

    def compiled_decode_step(self):
        """The model as one inductor graph per (batch, cache capacity), called for single-token steps with a
        fixed-shape context (TorchKVCache.begin): positions, slots and masks are tensors, so no step recompiles
        (dynamo counts at most recompile_limit, 8, shapes per process, then fails: fullgraph). Prefill runs eager.
        Inductor's and AOTAutograd's on-disk caches are off: they store pickles and load them back, and the project
        unpickles nothing (each process compiles afresh, about 13 s a shape here)."""
        compiled = torch.compile(self.model.run, fullgraph=True, dynamic=False,
                                 options={"fx_graph_cache": False, "autotune_local_cache": False})

        compiled_shapes: set[tuple[int, int]] = set()

        def step(capacity: int, tokens, context, ropes):
            shape = (tokens.shape[0], capacity)
            if shape in compiled_shapes:  # compiled already: no config patching on the hot path
                return compiled(tokens, context, ropes)
            with torch._functorch.config.patch(enable_autograd_cache=False), \
                    torch._dynamo.config.patch(automatic_dynamic_local_pgo=False):
                logits = compiled(tokens, context, ropes)  # the first call of a shape compiles it
            compiled_shapes.add(shape)
            return logits

        return step

    def new_cache(self, batch_size: int, capacity: int) -> TorchKVCache:
        if self.strategy.quant in KV_CACHES:
            return KV_CACHES[self.strategy.quant](self.config, batch_size, capacity, self.device)
        return TorchKVCache(self.config, batch_size, capacity, self.dtype, self.device)

    @property
    def implementation(self) -> str:
        return IMPLEMENTATION.get(self.strategy.quant, f"torch {self.dtype}".replace("torch.", ""))

    def quantized_linears(self):
        """Capability 'quantized-linears': each quantized layer with the format it stores (quantize.LinearView)."""
        return quantized_linears(self.model)

    def _inputs(self, tokens, positions, token_mask):
        tokens, positions = tokens.to(self.device), positions.to(self.device)
        mask = torch.ones_like(tokens, dtype=torch.bool) if token_mask is None else token_mask.to(self.device)
        return tokens, positions, mask

    @torch.inference_mode()
    def forward(self, cache: KVCache, tokens, positions, token_mask=None):
        if not isinstance(cache, TorchKVCache):
            raise TypeError(f"cache of type {type(cache).__name__} was not made by this runner")
        tokens, positions, mask = self._inputs(tokens, positions, token_mask)
        if self.decode_step is not None and tokens.shape[1] == 1:
            context = cache.begin(positions, mask, fixed_shape=True)
            return self.decode_step(cache.capacity, tokens, context, self.model.ropes(positions)).float()
        return self.model(tokens, cache.begin(positions, mask)).float()

    @torch.inference_mode()
    def forward_packed(self, cache: KVCache, tokens, positions, rows):
        if not isinstance(cache, TorchKVCache):
            raise TypeError(f"cache of type {type(cache).__name__} was not made by this runner")
        tokens, positions, rows = (x.to(self.device) for x in (tokens, positions, rows))
        return self.model(tokens[None], cache.begin_packed(positions, rows))[0].float()

    def new_paged_cache(self, n_blocks: int, block_size: int, fill: float = 0.0) -> TorchPagedKVCache:
        return TorchPagedKVCache(self.config, n_blocks, block_size, fill, self.dtype, self.device)

    @torch.inference_mode()
    def forward_paged(self, cache: PagedKVCache, tokens, positions, seqs, block_tables, context_lens):
        if not isinstance(cache, TorchPagedKVCache):
            raise TypeError(f"cache of type {type(cache).__name__} was not made by this backend")
        tokens, positions, seqs, block_tables, context_lens = (
            x.to(self.device) for x in (tokens, positions, seqs, block_tables, context_lens))
        return self.model(tokens[None], cache.begin(positions, seqs, block_tables, context_lens))[0].float()

    @torch.inference_mode()
    def forward_full(self, tokens, positions, token_mask=None):
        tokens, positions, mask = self._inputs(tokens, positions, token_mask)
        context = full_sequence_context(positions, mask)
        context.kv_round_trip = self.kv_round_trip
        return self.model(tokens, context).float()


@register
class TorchBackend(Backend):
    name = "torch"
    runner_class: type[TorchRunner] = TorchRunner  # a subclass may swap the runner (tests plant faults this way)

    @classmethod
    def capabilities(cls) -> frozenset[str]:
        return frozenset(
            [f"quant:{q.value}" for q in (*DTYPES, *QUANTS)]
            + [f"attention:{a.value}" for a in IMPLEMENTATIONS]
            + [f"position:{p}" for p in ("rope", "alibi", "learned", "sinusoidal")]
            + [f"batching:{b.value}" for b in Batching]
            + [f"execution:{e.value}" for e in Execution if e != Execution.EAGER]
            + ["kv-cache", "ragged-batch", "explicit-positions", "padding-mask", "cache-rollback", "attention-kernels",
               "quantized-linears", "quantized-kv"]
        )

    def attention_kernels(self) -> dict[Attention, AttentionFn]:
        """Capability 'attention-kernels': each declared attention implementation, callable at the kernel level
        with the signature documented in backends/torch_ref/attention.py (the flash attention suite uses it)."""
        return dict(IMPLEMENTATIONS)

    def load(self, checkpoint: Checkpoint, strategy: Strategy) -> TorchRunner:
        self.check_strategy(strategy)
        return self.runner_class(checkpoint, strategy, default_device())
