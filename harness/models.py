"""Models the suites run on: named built-ins and local Hugging Face directories (never a hub)."""
from __future__ import annotations

from functools import cache
from pathlib import Path

import torch

from backends.checkpoint import Checkpoint, CheckpointError, ModelConfig, RopeScaling, load_checkpoint
from backends.torch_ref.model import Transformer, init_random_weights

# A small seeded random Llama-style model: fast unit tests of the harness itself.
TINY_RANDOM = ModelConfig(vocab_size=512, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=344,
                          max_position_embeddings=1024)

NAMED_MODELS = {"tiny-random": TINY_RANDOM}
# The trained models committed to the repository (python -m harness train; see harness/training.py).
MODELS_DIR = Path(__file__).resolve().parents[1] / "models"
EMBEDDED_MODELS = {name: MODELS_DIR / name for name in ("default-target", "default-draft", "default-draft-nodistill")}
DEFAULT_MODEL = "default-target"


# Small configurations for the exactness matrices: every position encoding x every attention kind.
SMALL = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=160,
                    max_position_embeddings=256)
POSITION_VARIANTS: dict[str, dict] = {
    "rope": {},
    "rope-linear": {"rope_scaling": RopeScaling("linear", 4.0)},
    "rope-ntk": {"rope_scaling": RopeScaling("ntk", 4.0)},
    "rope-yarn": {"rope_scaling": RopeScaling("yarn", 4.0, original_max_position_embeddings=64)},
    # dynamic NTK changes the base once a sequence outgrows max_position_embeddings: keep that short
    "rope-dynamic-ntk": {"rope_scaling": RopeScaling("dynamic-ntk", 4.0), "max_position_embeddings": 16},
    "alibi": {"position": "alibi"},
    "learned": {"position": "learned"},
    "sinusoidal": {"position": "sinusoidal"},
}
ATTENTION_KINDS = {"mha": 4, "gqa": 2, "mqa": 1}  # n_kv_heads for SMALL's 4 query heads


@cache
def small_checkpoint(position: str, attention_kind: str, seed: int = 0) -> Checkpoint:
    """A seeded random SMALL model with the named position encoding and attention kind."""
    config = SMALL.replace(n_kv_heads=ATTENTION_KINDS[attention_kind], **POSITION_VARIANTS[position])
    return random_checkpoint(config, seed, name=f"small-{position}-{attention_kind}")


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
    if name_or_path in EMBEDDED_MODELS:
        return load_checkpoint(EMBEDDED_MODELS[name_or_path])
    if Path(name_or_path).exists():
        return load_checkpoint(name_or_path)
    raise CheckpointError(
        f"unknown model {name_or_path!r}: not a built-in ({', '.join([*NAMED_MODELS, *EMBEDDED_MODELS])}) nor an existing directory"
    )
