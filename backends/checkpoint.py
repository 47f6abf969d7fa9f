"""Model configuration and checkpoints: Hugging Face-format directories, safetensors only."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

POSITIONS = ("rope", "alibi", "learned", "sinusoidal")
ROPE_SCALINGS = ("linear", "ntk", "dynamic-ntk", "yarn")


class CheckpointError(ValueError):
    """A checkpoint directory or file that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class RopeScaling:
    kind: str  # one of ROPE_SCALINGS
    factor: float
    original_max_position_embeddings: int | None = None  # YaRN and dynamic NTK; defaults to the model's
    beta_fast: float = 32.0  # YaRN ramp bounds (Peng et al. 2023, section 3.2)
    beta_slow: float = 1.0

    def __post_init__(self):
        if self.kind not in ROPE_SCALINGS:
            raise ValueError(f"unknown RoPE scaling {self.kind!r}; accepted: {', '.join(ROPE_SCALINGS)}")


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer. Field names follow the transformer literature; to_hf/from_hf map them."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    max_position_embeddings: int = 2048
    position: str = "rope"  # one of POSITIONS
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    norm: str = "rmsnorm"  # or "layernorm"
    norm_eps: float = 1e-5
    mlp: str = "swiglu"  # or "gelu"
    tie_embeddings: bool = False
    qkv_bias: bool = False
    head_dim_override: int | None = None

    def __post_init__(self):
        if self.position not in POSITIONS:
            raise ValueError(f"unknown position encoding {self.position!r}; accepted: {', '.join(POSITIONS)}")
        if self.norm not in ("rmsnorm", "layernorm"):
            raise ValueError(f"unknown norm {self.norm!r}; accepted: rmsnorm, layernorm")
        if self.mlp not in ("swiglu", "gelu"):
            raise ValueError(f"unknown mlp {self.mlp!r}; accepted: swiglu, gelu")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.rope_scaling is not None and self.position != "rope":
            raise ValueError("rope_scaling is only meaningful with position='rope'")

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.d_model // self.n_heads

    @property
    def attention_kind(self) -> str:
        if self.n_kv_heads == self.n_heads:
            return "mha"
        return "mqa" if self.n_kv_heads == 1 else "gqa"

    @property
    def position_id(self) -> str:
        """The name used in test ids and records: 'rope', 'rope-yarn', 'alibi', ..."""
        return self.position if self.rope_scaling is None else f"rope-{self.rope_scaling.kind}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        data = dict(data)
        if data.get("rope_scaling") is not None:
            data["rope_scaling"] = RopeScaling(**data["rope_scaling"])
        return cls(**data)

    def replace(self, **changes) -> ModelConfig:
        return replace(self, **changes)


# --- Hugging Face config.json -------------------------------------------------------------------

_HF_ROPE_KIND = {"linear": "linear", "dynamic": "dynamic-ntk", "yarn": "yarn", "ntk": "ntk"}


def to_hf_config(config: ModelConfig) -> dict:
    """A Llama-family config.json; non-Llama choices are kept under our own keys so they round-trip."""
    hf = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "intermediate_size": config.d_ff,
        "max_position_embeddings": config.max_position_embeddings,
        "rope_theta": config.rope_theta,
        "rms_norm_eps": config.norm_eps,
        "hidden_act": "silu",
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": config.qkv_bias,
        "head_dim": config.head_dim,
        "torch_dtype": "float32",
    }
    if config.rope_scaling is not None:
        kind = {v: k for k, v in _HF_ROPE_KIND.items()}[config.rope_scaling.kind]
        hf["rope_scaling"] = {"rope_type": kind, "factor": config.rope_scaling.factor}
        if config.rope_scaling.original_max_position_embeddings is not None:
            hf["rope_scaling"]["original_max_position_embeddings"] = config.rope_scaling.original_max_position_embeddings
    extras = {"position": config.position, "norm": config.norm, "mlp": config.mlp}
    if extras != {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu"}:
        hf["architectures"] = ["ExactbenchDecoder"]
        hf["model_type"] = "exactbench"
        hf["exactbench"] = extras
    return hf


def from_hf_config(hf: dict, source: str = "config.json") -> ModelConfig:
    archs = hf.get("architectures") or []
    supported = ("LlamaForCausalLM", "MistralForCausalLM", "ExactbenchDecoder")
    if not any(a in supported for a in archs):
        raise CheckpointError(f"{source}: unsupported architecture {archs}; supported: {', '.join(supported)}")
    try:
        scaling = None
        if hf.get("rope_scaling"):
            rs = hf["rope_scaling"]
            kind = rs.get("rope_type", rs.get("type"))
            if kind not in _HF_ROPE_KIND:
                raise CheckpointError(f"{source}: unsupported rope_scaling type {kind!r}; supported: {', '.join(_HF_ROPE_KIND)}")
            scaling = RopeScaling(_HF_ROPE_KIND[kind], float(rs["factor"]), rs.get("original_max_position_embeddings"))
        n_heads = hf["num_attention_heads"]
        extras = hf.get("exactbench", {})
        return ModelConfig(
            vocab_size=hf["vocab_size"],
            d_model=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            d_ff=hf["intermediate_size"],
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rope_theta=hf.get("rope_theta", 10000.0),
            rope_scaling=scaling,
            norm_eps=hf.get("rms_norm_eps", 1e-5),
            tie_embeddings=hf.get("tie_word_embeddings", False),
            qkv_bias=hf.get("attention_bias", False),
            head_dim_override=hf.get("head_dim") if hf.get("head_dim") != hf["hidden_size"] // n_heads else None,
            position=extras.get("position", "rope"),
            norm=extras.get("norm", "rmsnorm"),
            mlp=extras.get("mlp", "swiglu"),
        )
    except KeyError as missing:
        raise CheckpointError(f"{source}: missing key {missing}") from None


# --- checkpoints ---------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    """A named model: its configuration and its weights (Hugging Face Llama parameter names)."""

    name: str
    config: ModelConfig
    weights: dict[str, torch.Tensor] = field(repr=False)
    directory: Path | None = None

    def fingerprint(self) -> str:
        """A short hash of configuration and weights: the key for anything derived from them (exports, caches)."""
        digest = hashlib.sha256(json.dumps(self.config.to_dict(), sort_keys=True).encode())
        for name in sorted(self.weights):
            tensor = self.weights[name].detach().contiguous().cpu()
            digest.update(name.encode())
            digest.update(str(tensor.dtype).encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        return digest.hexdigest()[:16]

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(to_hf_config(self.config), indent=2) + "\n")
        save_file({k: v.contiguous() for k, v in self.weights.items()}, str(directory / "model.safetensors"))


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load a local Hugging Face-format directory: config.json and *.safetensors. Pickles are refused."""
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory (a model is a Hugging Face-format directory)")
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{config_file}: missing (a model directory needs config.json)")
    try:
        hf = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{config_file}: not valid JSON ({error.msg} at line {error.lineno})") from None
    config = from_hf_config(hf, str(config_file))
    shards = sorted(directory.glob("*.safetensors"))
    if not shards:
        pickles = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
        hint = f" ({', '.join(pickles)} are pickles, which are never loaded)" if pickles else ""
        raise CheckpointError(f"{directory}: no *.safetensors weights{hint}")
    weights: dict[str, torch.Tensor] = {}
    for shard in shards:
        try:
            weights.update(load_file(str(shard)))
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"{shard}: unreadable safetensors file ({error})") from None
    return Checkpoint(directory.name, config, weights, directory)
