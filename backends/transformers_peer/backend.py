"""transformers' own model classes and KV cache behind the adapter contract, registered as 'transformers'.

Its DynamicCache holds one length for the whole batch: every row appends the same number of tokens per call, so
rows of their own lengths (packed or paged batching) and per-row rollback are not declared. Left padding works as
transformers' `generate` does it: the padding mask of every slot so far is passed with each call. The checkpoint is
read by `from_pretrained` from its directory (a built-in model is saved to the cache directory first, keyed by
fingerprint), fp32, with transformers' default attention (SDPA).
"""
from __future__ import annotations

import inspect
import json

import torch

from backends.base import Backend, KVCache, ModelRunner, NativeSpeculativeRunner, UnsupportedModel, import_package
from backends.cache import cache_root
from backends.checkpoint import Checkpoint, hf_architecture
from backends.registry import register
from backends.strategies import Attention, Batching, Quant, Strategy


def import_transformers():
    return import_package("transformers")


def check_rope_type(name: str, hf_config: dict) -> None:
    """A RoPE variant transformers does not implement (our static NTK) would run as plain RoPE: refuse it."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = hf_config.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default" and kind not in ROPE_INIT_FUNCTIONS:
        raise UnsupportedModel(f"{name}: transformers has no rope_type {kind!r} (it has: default, "
                               f"{', '.join(ROPE_INIT_FUNCTIONS)})")


def model_directory(checkpoint: Checkpoint):
    """The checkpoint's Hugging Face directory; a built-in model is saved once under the cache, by fingerprint."""
    if checkpoint.directory is not None:
        return checkpoint.directory
    directory = cache_root() / "transformers" / f"{checkpoint.name}-{checkpoint.fingerprint()}"
    if not (directory / "model.safetensors").exists():
        checkpoint.save(directory)
    return directory


class TransformersCache(KVCache):
    """A DynamicCache plus the padding mask of every slot so far, (B, length); one length for all rows."""

    def __init__(self, batch_size: int, capacity: int, dynamic_cache):
        self.hf = dynamic_cache
        self.mask = torch.zeros(batch_size, 0, dtype=torch.long)
        self._capacity = capacity

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def lengths(self) -> torch.Tensor:
        return torch.full((self.mask.shape[0],), self.mask.shape[1], dtype=torch.long)

    def truncate(self, lengths: torch.Tensor) -> None:
        target = {int(n) for n in lengths}
        if len(target) != 1 or target.pop() > self.mask.shape[1]:
            raise UnsupportedModel(f"transformers' DynamicCache rolls back the whole batch to one shorter length, "
                                   f"not {len(set(lengths.tolist()))} lengths (capability cache-rollback)")
        length = int(lengths[0])
        if length < self.mask.shape[1]:
            self.hf.crop(length - self.mask.shape[1])  # a negative count: remove that many slots (transformers 4.x and 5.x)
        self.mask = self.mask[:, :length]

    def reset(self, rows: torch.Tensor) -> None:
        raise UnsupportedModel("transformers' DynamicCache cannot empty single rows (capability batching:continuous)")

    @property
    def allocated_bytes(self) -> int:
        return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in self.hf.layers
                   if getattr(layer, "keys", None) is not None)

    @property
    def element_bytes(self) -> int:
        return 4


class TransformersRunner(ModelRunner, NativeSpeculativeRunner):
    def __init__(self, checkpoint: Checkpoint, strategy: Strategy):
        super().__init__(checkpoint, strategy)
        self.transformers = import_transformers()
        directory = model_directory(checkpoint)
        hf_config = json.loads((directory / "config.json").read_text())
        arch = hf_architecture(hf_config)
        if not hasattr(self.transformers, arch):
            raise UnsupportedModel(f"{checkpoint.name}: transformers has no class {arch}")
        check_rope_type(checkpoint.name, hf_config)
        self.model = getattr(self.transformers, arch).from_pretrained(directory, dtype=torch.float32).eval()
        # transformers 5.2x renamed the forward's past_key_values argument to cache
        self.cache_argument = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"

    @property
    def implementation(self) -> str:
        return f"transformers {self.transformers.__version__} {type(self.model).__name__} fp32"

    def new_cache(self, batch_size: int, capacity: int) -> TransformersCache:
        return TransformersCache(batch_size, capacity, self.transformers.DynamicCache(config=self.model.config))

    @torch.inference_mode()
    def forward(self, cache: KVCache, tokens, positions, token_mask=None):
        if not isinstance(cache, TransformersCache):
            raise TypeError(f"cache of type {type(cache).__name__} was not made by this runner")
        cache.check_room(tokens.shape[1])
        mask = torch.ones_like(tokens) if token_mask is None else token_mask.long()
        cache.mask = torch.cat([cache.mask, mask], dim=1)
        past = cache.mask.shape[1] - tokens.shape[1]
        out = self.model(input_ids=tokens, position_ids=positions, attention_mask=cache.mask, use_cache=True,
                         cache_position=torch.arange(past, cache.mask.shape[1]), **{self.cache_argument: cache.hf})
        return out.logits.float()

    @torch.inference_mode()
    def forward_full(self, tokens, positions, token_mask=None):
        mask = torch.ones_like(tokens) if token_mask is None else token_mask.long()
        return self.model(input_ids=tokens, position_ids=positions, attention_mask=mask, use_cache=False).logits.float()

    @torch.inference_mode()
    def generate_native(self, prompt, max_new_tokens, k=0, draft=None):
        """`generate`, greedy; k > 0: assisted generation (assistant_model=, a constant k tokens a round, no
        confidence cut-off) or, without a draft, prompt_lookup_num_tokens=k. No end-of-sequence token: exactly
        max_new_tokens, as the contract's generation makes."""
        if draft is not None and not isinstance(draft, TransformersRunner):
            raise TypeError(f"draft of type {type(draft).__name__} is not a transformers runner")
        settings = dict(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
        if k and draft is not None:
            settings.update(num_assistant_tokens=k, num_assistant_tokens_schedule="constant",
                            assistant_confidence_threshold=0.0)
        elif k:
            settings.update(prompt_lookup_num_tokens=k)
        tokens = torch.tensor([prompt])
        out = self.model.generate(tokens, attention_mask=torch.ones_like(tokens), assistant_model=draft and draft.model,
                                  generation_config=self.transformers.GenerationConfig(**settings))
        return out[0, len(prompt):].tolist()


@register
class TransformersBackend(Backend):
    name = "transformers"

    @classmethod
    def capabilities(cls) -> frozenset[str]:
        return frozenset([f"quant:{Quant.FP32.value}", f"attention:{Attention.NATIVE.value}",
                          "position:rope", "kv-cache", "explicit-positions", "padding-mask",
                          "speculative:native"]
                         + [f"batching:{b.value}" for b in (Batching.SEQUENTIAL, Batching.STATIC)])

    def load(self, checkpoint: Checkpoint, strategy: Strategy) -> TransformersRunner:
        self.check_strategy(strategy)
        return TransformersRunner(checkpoint, strategy)
