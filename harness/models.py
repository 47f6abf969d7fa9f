"""Models the suites run on: named built-ins and local Hugging Face directories (never a hub)."""
from __future__ import annotations

from pathlib import Path

import torch

from backends.checkpoint import Checkpoint, CheckpointError, ModelConfig, load_checkpoint
from backends.torch_ref.model import Transformer, init_random_weights

# A small seeded random Llama-style model: the default until trained models are embedded.
TINY_RANDOM = ModelConfig(vocab_size=512, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=344,
                          max_position_embeddings=1024)

NAMED_MODELS = {"tiny-random": TINY_RANDOM}
DEFAULT_MODEL = "tiny-random"


def random_checkpoint(config: ModelConfig, seed: int = 0, name: str | None = None) -> Checkpoint:
    """A checkpoint with seeded random weights: the same seed gives the same bytes."""
    generator = torch.Generator().manual_seed(seed)
    model = Transformer(config)
    init_random_weights(model, generator)
    return Checkpoint(name or f"random-{config.position_id}-{config.attention_kind}-s{seed}", config, model.export_weights())


def resolve_model(name_or_path: str) -> Checkpoint:
    """A named built-in model, or a local Hugging Face-format directory."""
    if name_or_path in NAMED_MODELS:
        return random_checkpoint(NAMED_MODELS[name_or_path], seed=0, name=name_or_path)
    if Path(name_or_path).exists():
        return load_checkpoint(name_or_path)
    raise CheckpointError(
        f"unknown model {name_or_path!r}: not a built-in ({', '.join(NAMED_MODELS)}) nor an existing directory"
    )
