"""Model configuration and checkpoints: Hugging Face-format directories, safetensors only."""
from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

POSITIONS = ("rope", "alibi", "learned", "sinusoidal")
# swiglu: down(silu(gate(x)) * up(x)); geglu: down(gelu_tanh(gate(x)) * up(x)) (Gemma);
# gelu: down(gelu_tanh(up(x))); gelu-exact: down(gelu_erf(up(x))), these two with biases
MLPS = ("swiglu", "geglu", "gelu", "gelu-exact")
# rmsnorm: w * x / rms(x) (Llama); rmsnorm-plus-one: (1 + w) * x / rms(x), in fp32 (Gemma); layernorm
NORMS = ("rmsnorm", "rmsnorm-plus-one", "layernorm")
ROPE_SCALINGS = ("linear", "ntk", "dynamic-ntk", "yarn", "llama3", "longrope")


class CheckpointError(ValueError):
    """A checkpoint directory or file that cannot be used; the message names the file and the problem."""


class CheckpointWarning(UserWarning):
    """A checkpoint that loads, read in a way its files leave open; the message says which reading was used."""


@dataclass(frozen=True)
class RopeScaling:
    kind: str  # one of ROPE_SCALINGS
    factor: float
    original_max_position_embeddings: int | None = None  # YaRN and dynamic NTK; defaults to the model's
    beta_fast: float = 32.0  # YaRN ramp bounds (Peng et al. 2023, section 3.2)
    beta_slow: float = 1.0
    low_freq_factor: float = 1.0  # Llama 3.1's wavelength bounds: original / low_freq_factor and / high_freq_factor
    high_freq_factor: float = 4.0
    # LongRoPE (Phi-3): per-frequency divisors, short up to original_max_position_embeddings, long beyond
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    attention_factor: float | None = None  # cos/sin magnitude (YaRN, LongRoPE); None: derived from factor

    def __post_init__(self):
        if self.kind not in ROPE_SCALINGS:
            raise ValueError(f"unknown RoPE scaling {self.kind!r}; accepted: {', '.join(ROPE_SCALINGS)}")
        for name in ("short_factor", "long_factor"):  # JSON gives lists; a frozen config keeps tuples
            object.__setattr__(self, name, tuple(float(f) for f in getattr(self, name)))


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
    norm: str = "rmsnorm"  # one of NORMS
    norm_eps: float = 1e-5
    mlp: str = "swiglu"  # one of MLPS
    tie_embeddings: bool = False
    qkv_bias: bool = False
    out_bias: bool = False  # a bias on the attention output projection (GPT-2; Llama with attention_bias)
    head_dim_override: int | None = None
    qk_norm: bool = False  # RMSNorm over each head's queries and keys before RoPE (Qwen3)
    rotary_fraction: float = 1.0  # RoPE on the first fraction of each head's dims only (GPT-NeoX, Phi-3's partial)
    parallel_residual: bool = False  # x + attn(ln1(x)) + mlp(ln2(x)) (GPT-NeoX, GPT-J)
    # Gemma 2 and 3
    sandwich_norms: bool = False  # each branch's output normed too: x + norm(attn(norm(x))), x + norm(mlp(norm(x)))
    embed_scale: bool = False  # token embeddings times sqrt(d_model)
    query_pre_attn_scalar: float | None = None  # attention scale 1/sqrt(this) instead of 1/sqrt(head_dim)
    attn_softcap: float | None = None  # attention scores cap * tanh(scores / cap), before the mask
    logit_softcap: float | None = None  # logits cap * tanh(logits / cap)
    sliding_window: int | None = None  # a query at position p sees keys at positions > p - sliding_window ...
    sliding_layers: tuple[int, ...] = ()  # ... in these layers (the others attend to every earlier key; indices past
                                          # n_layers are unused, so a config with fewer layers can be derived)
    local_rope_theta: float | None = None  # the sliding layers' RoPE base, unscaled (Gemma 3); None: rope_theta

    def __post_init__(self):
        if self.position not in POSITIONS:
            raise ValueError(f"unknown position encoding {self.position!r}; accepted: {', '.join(POSITIONS)}")
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; accepted: {', '.join(NORMS)}")
        if bool(self.sliding_layers) != (self.sliding_window is not None):
            raise ValueError("sliding_window and sliding_layers go together: a window and the layers it applies to")
        if self.mlp not in MLPS:
            raise ValueError(f"unknown mlp {self.mlp!r}; accepted: {', '.join(MLPS)}")
        if not 0 < self.rotary_fraction <= 1 or self.rotary_dim < 2 or self.rotary_dim % 2:
            raise ValueError(f"rotary_fraction={self.rotary_fraction} gives {self.rotary_dim} rotary dims of "
                             f"{self.head_dim}; accepted: an even number of dims, at least 2")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.rope_scaling is not None and self.position != "rope":
            raise ValueError("rope_scaling is only meaningful with position='rope'")
        if self.rope_scaling is not None and self.rope_scaling.kind == "longrope":
            lengths = {len(self.rope_scaling.short_factor), len(self.rope_scaling.long_factor)}
            if lengths != {self.rotary_dim // 2}:
                raise ValueError(f"longrope short_factor and long_factor have {sorted(lengths)} entries; "
                                 f"accepted: rotary_dim / 2 = {self.rotary_dim // 2} each")

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.d_model // self.n_heads

    @property
    def rotary_dim(self) -> int:
        """How many leading dims of each head RoPE rotates (transformers rounds the fraction down)."""
        return int(self.head_dim * self.rotary_fraction)

    def window(self, layer: int) -> int | None:
        """The sliding window of `layer`, or None where it attends to every earlier key."""
        return self.sliding_window if layer in self.sliding_layers else None

    def local_rope(self) -> ModelConfig:
        """The configuration whose RoPE the sliding layers use (Gemma 3: their own base, no scaling)."""
        if self.local_rope_theta is None:
            return self
        return self.replace(rope_theta=self.local_rope_theta, rope_scaling=None)

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
        data["sliding_layers"] = tuple(data.get("sliding_layers", ()))  # JSON keeps tuples as lists
        return cls(**data)

    def replace(self, **changes) -> ModelConfig:
        return replace(self, **changes)


# --- Hugging Face config.json -------------------------------------------------------------------

_HF_ROPE_KIND = {"linear": "linear", "dynamic": "dynamic-ntk", "yarn": "yarn", "ntk": "ntk", "llama3": "llama3",
                 "longrope": "longrope"}


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
        "attention_bias": config.qkv_bias,  # Llama's attention_bias puts a bias on q, k, v and o alike
        "head_dim": config.head_dim,
        "torch_dtype": "float32",
    }
    if config.rope_scaling is not None:
        kind = {v: k for k, v in _HF_ROPE_KIND.items()}[config.rope_scaling.kind]
        hf["rope_scaling"] = {"rope_type": kind, "factor": config.rope_scaling.factor}
        if config.rope_scaling.original_max_position_embeddings is not None:
            hf["rope_scaling"]["original_max_position_embeddings"] = config.rope_scaling.original_max_position_embeddings
        if config.rope_scaling.kind == "yarn":
            hf["rope_scaling"].update(beta_fast=config.rope_scaling.beta_fast, beta_slow=config.rope_scaling.beta_slow)
        if config.rope_scaling.kind == "llama3":
            hf["rope_scaling"].update(low_freq_factor=config.rope_scaling.low_freq_factor,
                                      high_freq_factor=config.rope_scaling.high_freq_factor)
        if config.rope_scaling.kind == "longrope":
            hf["rope_scaling"].update(short_factor=list(config.rope_scaling.short_factor),
                                      long_factor=list(config.rope_scaling.long_factor))
        if config.rope_scaling.attention_factor is not None:
            hf["rope_scaling"]["attention_factor"] = config.rope_scaling.attention_factor
    if config.rotary_fraction != 1.0:
        hf.setdefault("rope_scaling", {"rope_type": "default"})["partial_rotary_factor"] = config.rotary_fraction
    # Llama's layout: every key kept under "exactbench" at its default, but for the biases and q/k norms
    defaults = ModelConfig.__dataclass_fields__
    llama_layout = config.rotary_fraction == 1.0 and all(
        getattr(config, key) == defaults[key].default for key in _EXACTBENCH_KEYS if key not in ("out_bias", "qk_norm"))
    if llama_layout and config.qk_norm and config.out_bias == config.qkv_bias:  # Qwen3: q/k norms, Llama's biases
        hf.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3")
    elif llama_layout and not config.qk_norm and config.qkv_bias and not config.out_bias:  # Qwen2: q, k, v biases
        hf.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2")
        del hf["attention_bias"]
    elif not llama_layout or config.qk_norm or config.out_bias != config.qkv_bias:
        hf["architectures"] = ["ExactbenchDecoder"]
        hf["model_type"] = "exactbench"
        hf["exactbench"] = {key: getattr(config, key) for key in _EXACTBENCH_KEYS}
    return hf


# ModelConfig fields an ExactbenchDecoder config.json keeps under "exactbench" (no Hugging Face family has them all)
_EXACTBENCH_KEYS = ("position", "norm", "mlp", "out_bias", "qk_norm", "parallel_residual", "sandwich_norms", "embed_scale",
                    "query_pre_attn_scalar", "attn_softcap", "logit_softcap", "sliding_window", "sliding_layers",
                    "local_rope_theta")

# model_type -> architecture: what a config.json without `architectures` is read as (as transformers' Auto classes do)
ARCHITECTURE_OF_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                              "qwen3": "Qwen3ForCausalLM", "phi3": "Phi3ForCausalLM", "gpt2": "GPT2LMHeadModel",
                              "gpt_neox": "GPTNeoXForCausalLM", "gemma2": "Gemma2ForCausalLM",
                              "gemma3_text": "Gemma3ForCausalLM", "exactbench": "ExactbenchDecoder"}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURE_OF_MODEL_TYPE.values())
# RoPE keys the reference model implements; any other (YaRN's mscale and mscale_all_dim, truncate, ...) is refused
_ROPE_KEYS = {"rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
              "low_freq_factor", "high_freq_factor", "partial_rotary_factor", "short_factor", "long_factor",
              "attention_factor"}


def hf_architecture(hf: dict, source: str = "config.json") -> str:
    """The supported architecture a config.json names (`architectures`, else `model_type`), or a one-line error
    naming the supported ones."""
    archs = hf.get("architectures") or []
    if not archs and hf.get("model_type") in ARCHITECTURE_OF_MODEL_TYPE:
        return ARCHITECTURE_OF_MODEL_TYPE[hf["model_type"]]
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        named = f"architecture {archs}" if archs else f"model_type {hf.get('model_type')!r} (and no architectures)"
        raise CheckpointError(f"{source}: unsupported {named}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return arch


def unknown_model_type(hf: dict, source: str = "config.json") -> str | None:
    """A note when config.json names a supported architecture but a model_type that is not its family's."""
    model_type, arch = hf.get("model_type"), hf_architecture(hf, source)
    if model_type is None or ARCHITECTURE_OF_MODEL_TYPE.get(model_type) == arch:
        return None
    return f"{source}: model_type {model_type!r} is not {arch}'s; read as {arch} (from architectures)"


def hf_rope(hf: dict, source: str) -> tuple[float, RopeScaling | None, float]:
    """rope_theta, scaling and the rotary fraction, from transformers 5's rope_parameters or 4.x's rope_theta,
    rope_scaling and partial_rotary_factor."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default" and kind not in _HF_ROPE_KIND:
        raise CheckpointError(f"{source}: unsupported rope_scaling type {kind!r}; supported: default, {', '.join(_HF_ROPE_KIND)}")
    unknown = sorted(set(params) - _ROPE_KEYS)
    if unknown:
        raise CheckpointError(f"{source}: unsupported RoPE parameters {unknown}; supported: {', '.join(sorted(_ROPE_KEYS))}")
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    fraction = float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)))
    if kind == "default":
        return theta, None, fraction
    bounds = {k: params[k] for k in ("beta_fast", "beta_slow", "low_freq_factor", "high_freq_factor", "short_factor",
                                     "long_factor", "attention_factor") if params.get(k) is not None}
    # Phi-3 keeps original_max_position_embeddings beside rope_scaling and may leave the factor out
    original = params.get("original_max_position_embeddings", hf.get("original_max_position_embeddings"))
    factor = params.get("factor")
    if factor is None and kind == "longrope" and original:
        factor = hf.get("max_position_embeddings", 2048) / original
    if factor is None:
        raise CheckpointError(f"{source}: rope_scaling type {kind!r} without a factor")
    return theta, RopeScaling(_HF_ROPE_KIND[kind], float(factor), original, **bounds), fraction


def from_hf_config(hf: dict, source: str = "config.json") -> ModelConfig:
    arch = hf_architecture(hf, source)
    try:
        if arch == "GPT2LMHeadModel":
            from .families.gpt2 import gpt2_config

            return gpt2_config(hf, source)
        if arch == "GPTNeoXForCausalLM":
            from .families.gpt_neox import gpt_neox_config

            return gpt_neox_config(hf, source)
        if arch in ("Gemma2ForCausalLM", "Gemma3ForCausalLM"):
            from .families.gemma import gemma_config

            return gemma_config(hf, source, arch)
        if hf.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"{source}: hidden_act {hf['hidden_act']!r} unsupported; supported: silu")
        if hf.get("mlp_bias"):
            raise CheckpointError(f"{source}: mlp_bias=true unsupported; supported: false")
        qwen = arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM")
        # transformers reads sliding_window for Mistral and Phi-3 (every layer), and for Qwen when enabled
        windowed = arch in ("MistralForCausalLM", "Phi3ForCausalLM") or (qwen and hf.get("use_sliding_window", False))
        window = hf.get("sliding_window") if windowed else None
        if window is not None and window >= hf.get("max_position_embeddings", 2048):
            window = None  # a window no sequence outgrows
        if window is not None and qwen:  # Qwen slides only from max_window_layers on
            raise CheckpointError(f"{source}: sliding_window={window} with use_sliding_window=true unsupported for "
                                  f"{arch}; supported: Mistral's and Phi-3's, on every layer")
        theta, scaling, rotary_fraction = hf_rope(hf, source)
        n_heads = hf["num_attention_heads"]
        qkv_bias = arch == "Qwen2ForCausalLM" or hf.get("attention_bias", False)
        extras = dict(hf.get("exactbench", {}))
        if "sliding_layers" in extras:  # JSON keeps tuples as lists
            extras["sliding_layers"] = tuple(extras["sliding_layers"])
        return ModelConfig(**{
            "vocab_size": hf["vocab_size"],
            "d_model": hf["hidden_size"],
            "n_layers": hf["num_hidden_layers"],
            "n_heads": n_heads,
            "n_kv_heads": hf.get("num_key_value_heads") or n_heads,
            "d_ff": hf["intermediate_size"],
            "max_position_embeddings": hf.get("max_position_embeddings", 2048),
            "rope_theta": theta,
            "rope_scaling": scaling,
            "norm_eps": hf.get("rms_norm_eps", 1e-5),
            "tie_embeddings": hf.get("tie_word_embeddings", False),
            "qkv_bias": qkv_bias,
            "out_bias": qkv_bias and arch != "Qwen2ForCausalLM",
            "head_dim_override": hf.get("head_dim") if hf.get("head_dim") != hf["hidden_size"] // n_heads else None,
            "qk_norm": arch == "Qwen3ForCausalLM",
            "rotary_fraction": rotary_fraction,
            "sliding_window": window,
            "sliding_layers": tuple(range(hf["num_hidden_layers"])) if window is not None else (),
            **extras,  # an ExactbenchDecoder's own layout
        })
    except KeyError as missing:
        raise CheckpointError(f"{source}: missing key {missing}") from None
    except CheckpointError:
        raise
    except ValueError as error:  # ModelConfig's own checks, on values read from the file
        raise CheckpointError(f"{source}: {error}") from None


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
    note = unknown_model_type(hf, str(config_file))
    if note is not None:
        warnings.warn(note, CheckpointWarning, stacklevel=2)
    tokenizer_file = directory / TOKENIZER_FILE
    if tokenizer_file.is_file():
        check_tokenizer(tokenizer_file, config)
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
    arch = hf_architecture(hf, str(config_file))
    if arch == "GPT2LMHeadModel":
        from .families.gpt2 import gpt2_weights

        weights = gpt2_weights(weights, config, str(directory))
    elif arch == "GPTNeoXForCausalLM":
        from .families.gpt_neox import gpt_neox_weights

        weights = gpt_neox_weights(weights, config, str(directory))
    elif arch == "Phi3ForCausalLM":
        from .families.phi3 import phi3_weights

        weights = phi3_weights(weights, config, str(directory))
    checkpoint = Checkpoint(directory.name, config, without_redundant_tensors(weights, config, str(directory)), directory)
    check_weights(checkpoint)
    return checkpoint


def without_redundant_tensors(weights: dict[str, torch.Tensor], config: ModelConfig, source: str) -> dict[str, torch.Tensor]:
    """Drop what transformers also ignores: RoPE tables older checkpoints saved (recomputed from the config) and a
    tied head stored beside its embedding. A stored head that differs from the embedding it is tied to is refused:
    which of the two the model was trained with is unknowable."""
    weights = {name: tensor for name, tensor in weights.items() if not name.endswith("rotary_emb.inv_freq")}
    head, embedding = weights.get("lm_head.weight"), weights.get("model.embed_tokens.weight")
    if config.tie_embeddings and head is not None:
        if embedding is None or head.shape != embedding.shape or not torch.equal(head, embedding):
            raise CheckpointError(f"{source}: lm_head.weight differs from model.embed_tokens.weight although config.json "
                                  "says tie_word_embeddings=true (set it to false if the head is its own)")
        del weights["lm_head.weight"]
    return weights


def check_weights(checkpoint: Checkpoint) -> None:
    """Refuse weights that do not fit the config, naming the first tensor that does not: the parameters of the
    reference model (backends/torch_ref/model.py) are the canonical layout every backend reads."""
    from backends.torch_ref.model import parameter_shapes  # the model module imports this one

    expected = parameter_shapes(checkpoint.config)
    source = checkpoint.directory or checkpoint.name
    missing = sorted(set(expected) - set(checkpoint.weights))
    unexpected = sorted(set(checkpoint.weights) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{source}: weights do not fit the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for name, tensor in sorted(checkpoint.weights.items()):
        if tuple(tensor.shape) != expected[name]:
            raise CheckpointError(f"{source}: {name} has shape {tuple(tensor.shape)}, config needs {expected[name]}")


TOKENIZER_FILE = "tokenizer.json"


def check_tokenizer(path: Path, config: ModelConfig):
    """The `tokenizers` Tokenizer in `path`, refused when any of its ids falls outside the model's vocabulary."""
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises a bare Exception for malformed files
        raise CheckpointError(f"{path}: unreadable tokenizer ({str(error).splitlines()[0]})") from None
    largest = max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1)
    if largest >= config.vocab_size:
        raise CheckpointError(f"{path}: token id {largest} does not fit the model's vocab_size {config.vocab_size} (config.json)")
    return tokenizer
