"""KV-cache and weight memory of real model configurations, checked against the figures the seed quotes.

KV bytes per token = 2 (K and V) x n_layers x n_kv_heads x head_dim x bytes per element; weight bytes =
parameter count x bytes per parameter, the count computed from the architecture. Units: GB = 1e9 bytes and
MB = 1e6 bytes (as the seed quotes them); 4K and 128K tokens are 4,096 and 131,072.

`python -m harness kv-calc NAME_OR_CONFIG_JSON` prints one model; `--all` (or no argument) every named model
and the seed's claims; `--context 32K` sets the context lengths of the KV columns (repeatable; default 4K and
128K); `--publish RESULTS_DIR` also writes RESULTS_DIR/kv_calc.md (or regenerates the .md file it names).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd

from .records import write_atomic

BITS = {"fp32": 32, "fp16/bf16": 16, "int8": 8, "int4": 4}
CONTEXTS = {"4K": 4096, "128K": 131072}  # the KV columns' context lengths unless --context is given
SEED = "shared/seed/000_f5258716dac19bae.txt"  # the project's seed document, relative to the workplace root


class KvCalcError(ValueError):
    """A model name or config.json the calculator cannot use; the message names it and what is accepted."""


@dataclass(frozen=True)
class Arch:
    """The architecture facts that decide parameter count and KV-cache size."""

    name: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    vocab_size: int
    tie_embeddings: bool
    mlp: str  # "swiglu" (gate, up, down) or "gelu" (up, down)
    position: str  # "rope", "alibi" (no parameters) or "learned" (a max_positions x d_model table)
    max_positions: int
    norm: str  # "rmsnorm" (weight) or "layernorm" (weight and bias)
    norms_per_layer: int = 2  # 1 for Falcon-7B's parallel attention/MLP block with one shared LayerNorm
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None  # a rolling-buffer cache keeps at most this many tokens
    published_params: float | None = None
    published_source: str = ""

    @property
    def attention(self) -> str:
        if self.n_kv_heads == self.n_heads:
            return "MHA"
        return "MQA" if self.n_kv_heads == 1 else "GQA"


# Named configurations. Figures from each model's config.json on the Hugging Face hub unless noted; published
# parameter counts as the hub's model page shows them (safetensors header total) unless noted.
NAMED: dict[str, Arch] = {
    a.name: a
    for a in (
        # meta-llama/Llama-2-7b-hf config.json; Touvron et al. 2023 (Llama 2), Table 1: 7B has no GQA.
        Arch("llama-2-7b", 32, 4096, 32, 32, 128, 11008, 32000, False, "swiglu", "rope", 4096, "rmsnorm",
             published_params=6.74e9, published_source="HF hub meta-llama/Llama-2-7b-hf: 6.74B"),
        # meta-llama/Llama-2-70b-hf config.json; Llama 2 paper Table 1: 70B uses GQA (8 KV heads).
        Arch("llama-2-70b", 80, 8192, 64, 8, 128, 28672, 32000, False, "swiglu", "rope", 4096, "rmsnorm",
             published_params=69.0e9, published_source="HF hub meta-llama/Llama-2-70b-hf: 69.0B"),
        # meta-llama/Meta-Llama-3-8B config.json (vocab 128256, 8K context).
        Arch("llama-3-8b", 32, 4096, 32, 8, 128, 14336, 128256, False, "swiglu", "rope", 8192, "rmsnorm",
             published_params=8.03e9, published_source="HF hub meta-llama/Meta-Llama-3-8B: 8.03B"),
        # meta-llama/Meta-Llama-3-70B config.json.
        Arch("llama-3-70b", 80, 8192, 64, 8, 128, 28672, 128256, False, "swiglu", "rope", 8192, "rmsnorm",
             published_params=70.6e9, published_source="HF hub meta-llama/Meta-Llama-3-70B: 70.6B"),
        # mistralai/Mistral-7B-v0.1 config.json; Jiang et al. 2023 (Mistral 7B), Table 1 and section 2:
        # sliding window 4096 with a rolling-buffer cache of that many tokens.
        Arch("mistral-7b", 32, 4096, 32, 8, 128, 14336, 32000, False, "swiglu", "rope", 32768, "rmsnorm",
             sliding_window=4096,
             published_params=7.24e9, published_source="HF hub mistralai/Mistral-7B-v0.1: 7.24B"),
        # tiiuae/falcon-7b config.json: multi_query (1 KV head), parallel_attn with one LayerNorm, bias false,
        # rotary; ffn 4 x hidden and tied embeddings are FalconConfig's defaults.
        Arch("falcon-7b", 32, 4544, 71, 1, 64, 18176, 65024, True, "gelu", "rope", 2048, "layernorm",
             norms_per_layer=1,
             published_params=7e9, published_source="tiiuae/falcon-7b model card: 7B (nominal)"),
        # Brown et al. 2020 (GPT-3), Table 2.1: 96 layers, d_model 12288, 96 heads of 128, context 2048,
        # d_ff = 4 x d_model; "the same model and architecture as GPT-2" (section 2.1), so GPT-2's 50257-token
        # vocabulary, learned positions, LayerNorm, biases and tied embeddings.
        Arch("gpt-3-175b", 96, 12288, 96, 96, 128, 49152, 50257, True, "gelu", "learned", 2048, "layernorm",
             qkv_bias=True, o_bias=True, mlp_bias=True,
             published_params=175.0e9, published_source="Brown et al. 2020, Table 2.1: 175.0B"),
    )
}


# --- the formulas --------------------------------------------------------------------------------


def param_count(arch: Arch) -> int:
    """Every parameter: embeddings, attention (GQA-shaped K and V), MLP, norms, untied head."""
    d, q_width, kv_width = arch.d_model, arch.n_heads * arch.head_dim, arch.n_kv_heads * arch.head_dim
    norm = d * (2 if arch.norm == "layernorm" else 1)
    attention = d * q_width + 2 * d * kv_width + q_width * d
    attention += (q_width + 2 * kv_width) * arch.qkv_bias + d * arch.o_bias
    if arch.mlp == "swiglu":
        mlp = 3 * d * arch.d_ff + (2 * arch.d_ff + d) * arch.mlp_bias
    else:
        mlp = 2 * d * arch.d_ff + (arch.d_ff + d) * arch.mlp_bias
    layer = attention + mlp + arch.norms_per_layer * norm
    embeddings = arch.vocab_size * d * (1 if arch.tie_embeddings else 2)
    positions = arch.max_positions * d if arch.position == "learned" else 0
    return embeddings + positions + arch.n_layers * layer + norm  # + the final norm


def kv_bytes_per_token(arch: Arch, bits: int) -> int:
    return 2 * arch.n_layers * arch.n_kv_heads * arch.head_dim * bits // 8


def kv_bytes(arch: Arch, tokens: int, bits: int) -> int:
    """The cache for one sequence of `tokens`; a sliding-window model keeps only the last window."""
    cached = min(tokens, arch.sliding_window) if arch.sliding_window else tokens
    return cached * kv_bytes_per_token(arch, bits)


def weight_bytes(arch: Arch, bits: int) -> int:
    """Every parameter at `bits`; int8/int4 scales and zero points are not counted."""
    return param_count(arch) * bits // 8


# --- reading a Hugging Face config.json -----------------------------------------------------------

FAMILIES = ("llama", "mistral", "qwen2", "falcon", "gpt2")


def _int(hf: dict, source: str, *keys: str, default: int | None = None) -> int:
    for key in keys:
        if hf.get(key) is not None:
            value = hf[key]
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise KvCalcError(f"{source}: {key}={value!r} is not a positive integer")
            return value
    if default is None:
        raise KvCalcError(f"{source}: missing key {' or '.join(map(repr, keys))}")
    return default


def _head_dim(d_model: int, n_heads: int, source: str, alternative: str = "") -> int:
    """The hidden size split over the heads, for configs that do not state head_dim."""
    if d_model % n_heads:
        raise KvCalcError(f"{source}: hidden size {d_model} is not divisible by {n_heads} attention heads; "
                          f"accepted: a multiple of the head count{alternative}")
    return d_model // n_heads


def arch_from_hf(hf: dict, source: str) -> Arch:
    """The architecture a config.json describes, refused when its KV heads do not group its query heads."""
    arch = _family_arch(hf, source)
    if arch.n_heads % arch.n_kv_heads:
        raise KvCalcError(f"{source}: {arch.n_heads} attention heads over {arch.n_kv_heads} KV heads; accepted: "
                          f"a KV head count that divides the attention heads (each KV head serves a whole group)")
    return arch


def _family_arch(hf: dict, source: str) -> Arch:
    """The few keys each family's config.json needs (defaults as in transformers' config classes)."""
    family = hf.get("model_type")
    if family not in FAMILIES:
        raise KvCalcError(f"{source}: unsupported model_type {family!r}; supported: {', '.join(FAMILIES)}")
    name = Path(source).parent.name or source
    if family == "gpt2":
        d, n_heads = _int(hf, source, "n_embd"), _int(hf, source, "n_head")
        return Arch(name, _int(hf, source, "n_layer"), d, n_heads, n_heads, _head_dim(d, n_heads, source),
                    _int(hf, source, "n_inner", default=4 * d), _int(hf, source, "vocab_size"),
                    bool(hf.get("tie_word_embeddings", True)), "gelu", "learned",
                    _int(hf, source, "n_positions"), "layernorm", qkv_bias=True, o_bias=True, mlp_bias=True)
    d = _int(hf, source, "hidden_size")
    n_heads = _int(hf, source, "num_attention_heads", "n_head")
    n_layers = _int(hf, source, "num_hidden_layers", "n_layer")
    vocab = _int(hf, source, "vocab_size")
    if family == "falcon":
        # FalconConfig: num_kv_heads counts only with new_decoder_architecture; otherwise multi_query means 1.
        if hf.get("new_decoder_architecture"):
            n_kv = _int(hf, source, "num_kv_heads", default=n_heads)
            norms = _int(hf, source, "num_ln_in_parallel_attn", default=2)
        else:
            n_kv = 1 if hf.get("multi_query", True) else n_heads
            norms = 1 if hf.get("parallel_attn", True) else 2
        bias = bool(hf.get("bias", False))
        return Arch(name, n_layers, d, n_heads, n_kv, _head_dim(d, n_heads, source),
                    _int(hf, source, "ffn_hidden_size", default=4 * d),
                    vocab, bool(hf.get("tie_word_embeddings", True)), "gelu", "alibi" if hf.get("alibi") else "rope",
                    _int(hf, source, "max_position_embeddings", default=2048), "layernorm", norms_per_layer=norms,
                    qkv_bias=bias, o_bias=bias, mlp_bias=bias)
    attention_bias = bool(hf.get("attention_bias", False))
    head_dim = (_int(hf, source, "head_dim") if hf.get("head_dim") is not None
                else _head_dim(d, n_heads, source, ", or an explicit head_dim"))
    return Arch(name, n_layers, d, n_heads, _int(hf, source, "num_key_value_heads", default=n_heads),
                head_dim, _int(hf, source, "intermediate_size"), vocab,
                bool(hf.get("tie_word_embeddings", False)), "swiglu", "rope",
                _int(hf, source, "max_position_embeddings", default=2048), "rmsnorm",
                qkv_bias=attention_bias or family == "qwen2",  # Qwen2 always has q/k/v biases
                o_bias=attention_bias, mlp_bias=bool(hf.get("mlp_bias", False)),
                sliding_window=_int(hf, source, "sliding_window") if family == "mistral" and hf.get("sliding_window")
                else None)


def read_hf_config(path: Path) -> Arch:
    file = path / "config.json" if path.is_dir() else path
    try:
        hf = json.loads(file.read_text())
    except OSError as error:
        raise KvCalcError(f"{file}: unreadable ({error.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise KvCalcError(f"{file}: not valid JSON ({error})") from None
    if not isinstance(hf, dict):
        raise KvCalcError(f"{file}: not a JSON object (a Hugging Face config.json)")
    return arch_from_hf(hf, str(file))


def resolve(name_or_path: str) -> Arch:
    if name_or_path.lower() in NAMED:
        return NAMED[name_or_path.lower()]
    path = Path(name_or_path)
    if path.exists() or path.suffix == ".json" or os.sep in name_or_path:
        return read_hf_config(path)
    raise KvCalcError(
        f"unknown model {name_or_path!r}; accepted: {', '.join(NAMED)}, or a path to a Hugging Face config.json"
    )


# --- tables ----------------------------------------------------------------------------------------


def architecture_table(archs: list[Arch]) -> pd.DataFrame:
    rows = []
    for a in archs:
        params = param_count(a)
        rows.append({
            "model": a.name, "layers": a.n_layers, "d_model": a.d_model, "heads": a.n_heads,
            "kv heads": a.n_kv_heads, "head dim": a.head_dim, "d_ff": a.d_ff, "vocab": a.vocab_size,
            "attention": a.attention, "mlp": a.mlp, "positions": a.position, "tied": a.tie_embeddings,
            "context": a.max_positions, "window": a.sliding_window, "params (B)": params / 1e9,
            "published (B)": a.published_params / 1e9 if a.published_params else math.nan,
            "diff %": 100 * (params / a.published_params - 1) if a.published_params else math.nan,
        })
    return pd.DataFrame(rows)


def memory_table(archs: list[Arch], contexts: dict[str, int] = CONTEXTS) -> pd.DataFrame:
    rows = []
    for a in archs:
        for dtype, bits in BITS.items():
            row = {"model": a.name, "dtype": dtype, "KV bytes/token": kv_bytes_per_token(a, bits)}
            row |= {f"KV {label} (GB)": kv_bytes(a, tokens, bits) / 1e9 for label, tokens in contexts.items()}
            row["weights (GB)"] = weight_bytes(a, bits) / 1e9
            rows.append(row)
    return pd.DataFrame(rows)


# --- the seed's quoted figures, checked -------------------------------------------------------------

FP16 = BITS["fp16/bf16"]
# Each quantity: (label, function of an Arch, the Arch fields it depends on).
QUANTITIES = {
    "kv_token_MB": ("fp16 KV per token (MB)", lambda a: kv_bytes_per_token(a, FP16) / 1e6,
                    ("n_layers", "n_kv_heads", "head_dim")),
    "kv_4k_GB": ("fp16 KV at 4,096 tokens (GB)", lambda a: kv_bytes(a, 4096, FP16) / 1e9,
                 ("n_layers", "n_kv_heads", "head_dim")),
    "kv_128k_GB": ("fp16 KV at 131,072 tokens (GB)", lambda a: kv_bytes(a, 131072, FP16) / 1e9,
                   ("n_layers", "n_kv_heads", "head_dim")),
    "kv_128k_over_weights": ("fp16 KV at 131,072 tokens / fp16 weights",
                             lambda a: kv_bytes(a, 131072, FP16) / weight_bytes(a, FP16), ("n_kv_heads",)),
    "kv_pct_of_mha": ("KV size, % of MHA", lambda a: 100 * a.n_kv_heads / a.n_heads, ("n_kv_heads", "n_heads")),
    "kv_reduction": ("KV reduction vs MHA (x)", lambda a: a.n_heads / a.n_kv_heads, ("n_heads", "n_kv_heads")),
    "weights_fp16_GB": ("fp16 weights (GB)", lambda a: weight_bytes(a, FP16) / 1e9, ()),
    "weights_int4_GB": ("int4 weights (GB)", lambda a: weight_bytes(a, BITS["int4"]) / 1e9, ()),
}
APPROX = 0.05  # "~" figures are rounded: they hold within 5% (2.6 MB quotes 2.62 MB, ~330 GB quotes 344 GB)


@dataclass(frozen=True)
class Claim:
    line: int  # in SEED
    text: str  # as the seed writes it; " / " joins consecutive lines
    quantity: str  # a key of QUANTITIES
    low: float
    high: float
    models: tuple[str, ...]
    assumes: dict[str, int] = field(default_factory=dict)  # the Arch facts the claim's own arithmetic uses
    tolerance: float = 0.0  # APPROX for "~" figures, 0 for stated bounds


CLAIMS = (
    Claim(114, "Per token: 2 * 64 * 128 * 2 bytes * 80 layers = 2.6 MB", "kv_token_MB", 2.6, 2.6,
          ("llama-2-70b",), {"n_kv_heads": 64}, APPROX),
    Claim(115, "For 4096 tokens: ~10.5 GB", "kv_4k_GB", 10.5, 10.5, ("llama-2-70b",), {"n_kv_heads": 64}, APPROX),
    Claim(116, "For 128K tokens: ~330 GB", "kv_128k_GB", 330, 330, ("llama-2-70b",), {"n_kv_heads": 64}, APPROX),
    Claim(116, "(more than the model weights!)", "kv_128k_over_weights", 1, math.inf,
          ("llama-2-70b",), {"n_kv_heads": 64}),
    Claim(161, "E.g., 32 Q heads grouped into 8 KV groups (4 Q heads per KV group) / KV cache reduced by 4x",
          "kv_reduction", 4, 4,
          ("llama-3-8b", "mistral-7b")),
    Claim(178, "| MHA | GPT-3, older models | Baseline (100%) |", "kv_pct_of_mha", 100, 100, ("gpt-3-175b",)),
    Claim(179, "| GQA | Llama 2/3, Mistral, Gemma | ~12-25% of MHA |", "kv_pct_of_mha", 12, 25,
          ("llama-2-7b", "llama-2-70b", "llama-3-8b", "llama-3-70b", "mistral-7b"), tolerance=APPROX),
    Claim(180, "| MQA | Falcon, PaLM, some GPT variants | ~3-6% of MHA |", "kv_pct_of_mha", 3, 6,
          ("falcon-7b",), tolerance=APPROX),
    Claim(354, "A 70B parameter model at FP16 requires ~140GB of VRAM", "weights_fp16_GB", 140, 140,
          ("llama-2-70b", "llama-3-70b"), tolerance=APPROX),
    Claim(355, "At INT4, it needs ~35GB", "weights_int4_GB", 35, 35, ("llama-2-70b", "llama-3-70b"),
          tolerance=APPROX),
    Claim(436, "| KV cache (GQA/MQA) | Memory | 4-32x cache reduction |", "kv_reduction", 4, 32,
          ("llama-2-70b", "llama-3-8b", "llama-3-70b", "mistral-7b", "falcon-7b")),
)


def _within(value: float, claim: Claim) -> bool:
    return claim.low * (1 - claim.tolerance) <= value <= claim.high * (1 + claim.tolerance)


def claims_table(claims: tuple[Claim, ...] = CLAIMS) -> pd.DataFrame:
    """One row per claim and model: the computed value, whether the claim holds, and why not when it does not."""
    rows = []
    for claim in claims:
        label, compute, fields = QUANTITIES[claim.quantity]
        for model in claim.models:
            arch = NAMED[model]
            value = compute(arch)
            assumed = compute(replace(arch, **claim.assumes)) if claim.assumes else math.nan
            holds = _within(value, claim)
            reason = ""
            if not holds and claim.assumes and _within(assumed, claim):
                reason = "holds only with " + ", ".join(
                    f"{k}={v} (the model has {getattr(arch, k)})" for k, v in claim.assumes.items())
            elif not holds and fields:
                reason = f"{model} is {arch.attention}: " + ", ".join(f"{k}={getattr(arch, k)}" for k in fields)
            elif not holds:
                reason = f"{model} has {param_count(arch) / 1e9:.2f}B parameters"
            rows.append({
                "seed line": claim.line, "claim": claim.text, "model": model, "quantity": label,
                "claimed": f"{claim.low:g}" if claim.low == claim.high else f"{claim.low:g} to {claim.high:g}",
                "computed": value, "under the claim's assumption": assumed,
                "holds": "yes" if holds else "no", "reason": reason,
            })
    return pd.DataFrame(rows)


# --- output ----------------------------------------------------------------------------------------


def _markdown(frame: pd.DataFrame) -> str:
    """Blank cells for NaN, and '|' in a quoted claim escaped so it does not split the Markdown cell."""
    cells = frame.map(lambda v: v.replace("|", "\\|") if isinstance(v, str) else v)
    cells = cells.astype(object).where(cells.notna(), None)
    return cells.to_markdown(index=False, floatfmt=".4g", missingval="")


def render(archs: list[Arch], with_claims: bool, contexts: dict[str, int] = CONTEXTS) -> str:
    parts = [
        "## Architectures and parameter counts", "",
        _markdown(architecture_table(archs)), "",
        "## KV cache and weights per dtype", "",
        "KV bytes/token = 2 x layers x KV heads x head dim x bytes per element; one sequence; GB = 1e9 bytes. "
        "Weights: every parameter at the dtype, without int8/int4 scales. A model with a sliding window "
        "caches at most that many tokens.", "",
        _markdown(memory_table(archs, contexts)), "",
    ]
    if with_claims:
        parts += [
            f"## The seed's quoted figures ({SEED})", "",
            f"'~' figures hold within {APPROX:.0%}; stated bounds exactly. 'under the claim's assumption' "
            "recomputes with the facts the claim's own arithmetic uses.", "",
            _markdown(claims_table()), "",
        ]
    return "\n".join(parts)


TITLE = "# KV-cache and weights calculator"


def publish_path(destination: Path) -> Path:
    """The file --publish writes: DESTINATION/kv_calc.md for a directory (existing, or a new path without .md),
    else DESTINATION itself. An existing file is regenerated only if it is a kv-calc table: nothing else is
    overwritten."""
    if destination.is_dir() or (not destination.exists() and destination.suffix != ".md"):
        return destination / "kv_calc.md"
    if destination.exists():
        try:
            with destination.open("rb") as handle:
                first_line = handle.readline().rstrip(b"\n")
        except OSError as error:
            raise KvCalcError(f"{destination}: unreadable ({error.strerror})") from None
        if first_line != TITLE.encode():
            raise KvCalcError(f"{destination}: exists and is not a kv-calc table, so it is not overwritten; "
                              "accepted: a results directory, a new .md file, or an earlier kv-calc table")
    return destination


def publish(destination: Path) -> Path:
    """Write the table of every named model and the seed's claims to publish_path(destination), atomically
    (a temporary file beside it, then a rename): a reader sees the old table or the new one, never half."""
    target = publish_path(destination)
    target.parent.mkdir(parents=True, exist_ok=True)
    text = (f"{TITLE}\n\nGenerated by `python -m harness kv-calc --all --publish RESULTS_DIR`; do not edit by "
            "hand.\n\n" + render(list(NAMED.values()), with_claims=True))
    write_atomic(target, text)
    return target


def publish_destination(text: str) -> Path:
    if not text:
        raise argparse.ArgumentTypeError("'' is empty; accepted: a results directory or a .md file")
    return Path(text)


def context_length(text: str) -> int:
    """A --context value: tokens as a positive integer, or a multiple of 1K = 1,024 tokens ("32K")."""
    digits, multiplier = (text[:-1], 1024) if text[-1:] in ("K", "k") else (text, 1)
    if not digits.isdigit() or int(digits) == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a context length; accepted: a positive number of "
                                         "tokens, such as 8192 or 32K (1K = 1,024 tokens)")
    return int(digits) * multiplier


def context_label(tokens: int) -> str:
    return f"{tokens // 1024}K" if tokens % 1024 == 0 else f"{tokens:,}"


def main_kv_calc(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness kv-calc", description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", metavar="NAME_OR_CONFIG_JSON",
                        help=f"one of {', '.join(NAMED)}, or a Hugging Face config.json (default: every named model)")
    parser.add_argument("--all", action="store_true", help="every named model and the seed's claims (the default)")
    parser.add_argument("--context", metavar="TOKENS", type=context_length, action="append",
                        help="a context length for the KV columns, in tokens or K (1,024 tokens); repeatable "
                             f"(default: {' and '.join(CONTEXTS)})")
    parser.add_argument("--publish", metavar="RESULTS_DIR", type=publish_destination,
                        help="also write RESULTS_DIR/kv_calc.md for every named model at the default context "
                             "lengths, or regenerate the kv-calc .md file named (default: print only)")
    try:
        args = parser.parse_args(argv)
        if args.model and args.all:
            parser.error("give a model or --all, not both")
        if args.context and args.publish:
            parser.error(f"--context and --publish: the published table has the default context lengths "
                         f"({' and '.join(CONTEXTS)}); give one or the other")
    except SystemExit as stop:  # argparse has printed usage or help
        return int(stop.code or 0)
    contexts = {context_label(tokens): tokens for tokens in args.context} if args.context else CONTEXTS
    try:
        archs = [resolve(args.model)] if args.model else list(NAMED.values())
        destination = publish_path(args.publish) if args.publish else None
    except KvCalcError as error:
        print(f"kv-calc: {error}", file=sys.stderr)
        return 2
    print(render(archs, with_claims=not args.model, contexts=contexts))
    if destination:
        try:
            print(f"wrote {publish(destination)}")
        except OSError as error:
            where = f": {error.filename}" if error.filename and error.filename != str(destination) else ""
            print(f"kv-calc: cannot write {destination} ({error.strerror}{where})", file=sys.stderr)
            return 2
    return 0
