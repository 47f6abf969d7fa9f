"""Models the suites run on: named built-ins and local Hugging Face directories (never a hub)."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
import torch

from backends.checkpoint import Checkpoint, CheckpointError, ModelConfig, RopeScaling, load_checkpoint
from backends.torch_ref.model import Transformer, full_sequence_context, init_random_weights

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


def config_matrix(positions=tuple(POSITION_VARIANTS), kinds=tuple(ATTENTION_KINDS)) -> list[tuple[str, str]]:
    """(position, attention kind) pairs of the built-in configuration matrix."""
    return [(position, kind) for position in positions for kind in kinds]


@dataclass(frozen=True)
class ModelCase:
    """What a model-level test runs on: the --model checkpoint, or one configuration of the built-in matrix.
    Its str is the model's name: the test id and the record's `model` parameter show it."""

    name: str
    position: str
    kind: str
    user_checkpoint: Checkpoint | None = None  # None: the matrix configuration's small model

    @property
    def checkpoint(self) -> Checkpoint:
        return self.user_checkpoint or small_checkpoint(self.position, self.kind)

    def __str__(self) -> str:
        return self.name


def model_params(user: Checkpoint, matrix: list[tuple[str, str]]) -> list:
    """pytest parameters: the --model checkpoint, then every configuration of `matrix` marked `config_matrix`
    (so `-m "not config_matrix"` leaves the matrix out and `-m config_matrix` keeps only it)."""
    mine = ModelCase(user.name, user.config.position_id, user.config.attention_kind, user)
    params = [pytest.param(mine, id=mine.name)]
    for position, kind in matrix:
        case = ModelCase(f"small-{position}-{kind}", position, kind)
        params.append(pytest.param(case, id=case.name, marks=pytest.mark.config_matrix))
    return params


def parametrize_models(metafunc: pytest.Metafunc, matrix: list[tuple[str, str]]) -> None:
    """A suite module's pytest_generate_tests: a test taking `model` runs on the --model checkpoint; one taking
    `case` runs on it and on every configuration of `matrix`. Either is a ModelCase whose name is in the test id."""
    from .plugin import SESSION  # the plugin imports this module

    user = metafunc.config.stash[SESSION].model
    if "model" in metafunc.fixturenames:
        metafunc.parametrize("model", model_params(user, []))
    if "case" in metafunc.fixturenames:
        metafunc.parametrize("case", model_params(user, matrix))


def random_checkpoint(config: ModelConfig, seed: int = 0, name: str | None = None) -> Checkpoint:
    """A checkpoint with seeded random weights: the same seed gives the same bytes."""
    generator = torch.Generator().manual_seed(seed)
    model = Transformer(config)
    init_random_weights(model, generator)
    return Checkpoint(name or f"random-{config.position_id}-{config.attention_kind}-s{seed}", config, model.export_weights())


def trained_scale_checkpoint(config: ModelConfig, seed: int = 0, max_logit: float = 30.0) -> Checkpoint:
    """Seeded random weights with the output head scaled so the logits reach about +-max_logit, as a trained
    model's do (random initializations give +-3 to 10): fp32 rounding grows with that magnitude."""
    checkpoint = random_checkpoint(config, seed)
    model = Transformer(config)
    model.load_state_dict(checkpoint.weights, strict=False)
    tokens = torch.randint(1, config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(seed))
    context = full_sequence_context(torch.arange(32)[None], torch.ones_like(tokens, dtype=torch.bool))
    with torch.inference_mode():
        largest = model(tokens, context).abs().max().item()
    head = "model.embed_tokens.weight" if config.tie_embeddings else "lm_head.weight"
    weights = {**checkpoint.weights, head: checkpoint.weights[head] * (max_logit / largest)}
    return Checkpoint(f"trained-scale-{config.position_id}-{config.attention_kind}-s{seed}", config, weights)


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
