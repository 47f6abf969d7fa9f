"""The KV-cache and weights calculator: formulas, named configurations, config.json reading, claims, CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from harness.kv_calc import (
    CLAIMS,
    NAMED,
    SEED,
    Arch,
    claims_table,
    kv_bytes,
    kv_bytes_per_token,
    main_kv_calc,
    memory_table,
    param_count,
    publish,
    read_hf_config,
    weight_bytes,
)

ROOT = Path(__file__).resolve().parents[1]

# Small enough to count by hand (see the sums in each test).
TINY_GQA = Arch("tiny-gqa", n_layers=2, d_model=8, n_heads=4, n_kv_heads=2, head_dim=2, d_ff=16, vocab_size=10,
                tie_embeddings=False, mlp="swiglu", position="rope", max_positions=16, norm="rmsnorm")
TINY_GPT = Arch("tiny-gpt", n_layers=1, d_model=4, n_heads=2, n_kv_heads=2, head_dim=2, d_ff=8, vocab_size=5,
                tie_embeddings=True, mlp="gelu", position="learned", max_positions=3, norm="layernorm",
                qkv_bias=True, o_bias=True, mlp_bias=True)


def test_kv_bytes_per_token_on_a_tiny_config():
    # 2 (K, V) x 2 layers x 2 KV heads x head dim 2 = 16 elements per token
    assert [kv_bytes_per_token(TINY_GQA, bits) for bits in (32, 16, 8, 4)] == [64, 32, 16, 8]
    assert kv_bytes(TINY_GQA, 10, 16) == 320
    # a rolling-buffer cache keeps only the window
    assert kv_bytes(replace(TINY_GQA, sliding_window=4), 10, 16) == 4 * 32
    assert kv_bytes(replace(TINY_GQA, sliding_window=4), 3, 16) == 3 * 32


def test_param_count_on_tiny_configs():
    # embeddings 10x8 and an untied head 10x8 = 160; per layer: q 8x8 + k, v 8x4 each + o 8x8 = 192,
    # SwiGLU 3 x 8x16 = 384, two RMSNorms 2x8 = 16 -> 592, twice = 1184; final RMSNorm 8: 1352
    assert param_count(TINY_GQA) == 1352
    # tied embeddings 5x4 = 20, learned positions 3x4 = 12; layer: qkv 3 x 4x4 + 12 biases = 60, o 16 + 4 = 20,
    # GELU MLP 2 x 4x8 + 8 + 4 = 76, two LayerNorms 2 x 8 = 16 -> 172; final LayerNorm 8: 212
    assert param_count(TINY_GPT) == 212
    assert weight_bytes(TINY_GPT, 4) == 106  # half a byte per parameter


def test_known_kv_figures():
    assert kv_bytes_per_token(NAMED["llama-2-7b"], 16) == 524_288  # 0.5 MiB
    assert kv_bytes_per_token(NAMED["llama-3-8b"], 16) == 131_072
    assert kv_bytes_per_token(NAMED["llama-2-70b"], 16) == 327_680  # 8 KV heads, not the seed's 64


# The model cards give falcon-7b only as a nominal "7B"; its exact count is checked against transformers below.
@pytest.mark.parametrize("name", [n for n in NAMED if n != "falcon-7b"])
def test_param_counts_match_published_sizes(name):
    arch = NAMED[name]
    assert param_count(arch) == pytest.approx(arch.published_params, rel=0.01)


def _hf_config(arch: Arch):
    """The named architecture as a transformers config object, from its config.json keys."""
    transformers = pytest.importorskip("transformers")
    if arch.name.startswith("llama"):
        return transformers.LlamaConfig(
            vocab_size=arch.vocab_size, hidden_size=arch.d_model, intermediate_size=arch.d_ff,
            num_hidden_layers=arch.n_layers, num_attention_heads=arch.n_heads, num_key_value_heads=arch.n_kv_heads,
            max_position_embeddings=arch.max_positions)
    if arch.name.startswith("mistral"):
        return transformers.MistralConfig(
            vocab_size=arch.vocab_size, hidden_size=arch.d_model, intermediate_size=arch.d_ff,
            num_hidden_layers=arch.n_layers, num_attention_heads=arch.n_heads, num_key_value_heads=arch.n_kv_heads,
            max_position_embeddings=arch.max_positions, sliding_window=arch.sliding_window)
    if arch.name.startswith("falcon"):  # the keys of tiiuae/falcon-7b's config.json
        return transformers.FalconConfig(
            vocab_size=arch.vocab_size, hidden_size=arch.d_model, num_hidden_layers=arch.n_layers,
            num_attention_heads=arch.n_heads, multi_query=True, parallel_attn=True, bias=False,
            new_decoder_architecture=False)
    # GPT-3 is GPT-2's architecture at a larger size (Brown et al. 2020, section 2.1)
    return transformers.GPT2Config(vocab_size=arch.vocab_size, n_positions=arch.max_positions, n_embd=arch.d_model,
                                   n_layer=arch.n_layers, n_head=arch.n_heads)


@pytest.mark.parametrize("name", list(NAMED))
def test_named_configs_match_transformers(name, tmp_path):
    """Hugging Face's own model classes, built on the meta device (no memory), count the same parameters,
    and the config.json they write reads back as the same architecture."""
    import torch
    from transformers import AutoModelForCausalLM

    arch = NAMED[name]
    config = _hf_config(arch)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert param_count(arch) == sum(p.numel() for p in model.parameters())  # tied weights counted once

    config.save_pretrained(tmp_path)
    read = read_hf_config(tmp_path / "config.json")
    assert replace(read, name=name, published_params=arch.published_params,
                   published_source=arch.published_source) == arch


# Families read from config.json beyond the named models: Qwen2-0.5B's shape (tied, q/k/v biases), Falcon-40B's
# (new decoder architecture, 8 KV groups, two LayerNorms) and GPT-2 124M.
OTHER_CONFIGS = {
    "qwen2": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "falcon": dict(vocab_size=65024, hidden_size=8192, num_hidden_layers=60, num_attention_heads=128,
                   num_kv_heads=8, new_decoder_architecture=True, parallel_attn=True, bias=False),
    "gpt2": dict(),
}


@pytest.mark.parametrize("family", list(OTHER_CONFIGS))
def test_config_json_families_match_transformers(family, tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch

    config = transformers.AutoConfig.for_model(family, **OTHER_CONFIGS[family])
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    config.save_pretrained(tmp_path)
    assert param_count(read_hf_config(tmp_path)) == sum(p.numel() for p in model.parameters())


def test_claims_are_quoted_from_the_seed():
    seed = ROOT.parent / SEED
    if not seed.is_file():
        pytest.skip(f"the seed document {seed} is not in this checkout's workplace")
    lines = seed.read_text().splitlines()
    for claim in CLAIMS:
        for offset, part in enumerate(claim.text.split(" / ")):
            assert part in lines[claim.line - 1 + offset], (claim.line, part)


def test_claims_table_flags_the_wrong_kv_head_count():
    table = claims_table()
    per_token = table[(table["seed line"] == 114)].iloc[0]
    assert per_token["computed"] == pytest.approx(0.32768)
    assert per_token["under the claim's assumption"] == pytest.approx(2.62144)
    assert per_token["holds"] == "no" and "n_kv_heads=64 (the model has 8)" in per_token["reason"]
    gqa = table[table["seed line"] == 179].set_index("model")
    assert gqa.loc["llama-2-7b", "holds"] == "no" and "MHA" in gqa.loc["llama-2-7b", "reason"]
    assert gqa.loc["llama-3-8b", "holds"] == "yes"
    weights = table[table["seed line"] == 354].set_index("model")
    assert weights.loc["llama-2-70b", "computed"] == pytest.approx(137.95, rel=1e-3)
    assert (weights["holds"] == "yes").all()
    assert (table.loc[table["holds"] == "no", "reason"] != "").all()


def test_config_json_from_a_path(tmp_path, capsys):
    config = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
              "num_key_value_heads": 1, "intermediate_size": 128, "vocab_size": 100}
    (tmp_path / "config.json").write_text(json.dumps(config))
    arch = read_hf_config(tmp_path)  # a model directory reads its config.json
    assert (arch.n_kv_heads, arch.head_dim, arch.attention) == (1, 16, "MQA")
    assert main_kv_calc([str(tmp_path / "config.json")]) == 0
    out = capsys.readouterr().out
    assert f"{2 * 3 * 1 * 16 * 2}" in out and "MQA" in out  # fp16 KV bytes per token


_LLAMA = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 2, "num_attention_heads": 32,
          "num_key_value_heads": 8, "intermediate_size": 64, "vocab_size": 10}


@pytest.mark.parametrize("content, expected", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "not a JSON object"),
    (json.dumps({"model_type": "t5"}), "unsupported model_type 't5'; supported: llama"),
    (json.dumps({"model_type": "llama", "hidden_size": 64}), "missing key 'num_attention_heads'"),
    (json.dumps({"model_type": "gpt2", "n_embd": "768", "n_head": 12, "n_layer": 2, "vocab_size": 10,
                 "n_positions": 8}), "n_embd='768' is not a positive integer"),
    # KV heads must group the query heads: neither 32 over 5 nor 8 over 32
    (json.dumps(_LLAMA | {"num_attention_heads": 32, "num_key_value_heads": 5}),
     "32 attention heads over 5 KV heads; accepted: a KV head count that divides the attention heads"),
    (json.dumps(_LLAMA | {"num_attention_heads": 8, "num_key_value_heads": 32}), "8 attention heads over 32 KV heads"),
    (json.dumps(_LLAMA | {"model_type": "falcon", "new_decoder_architecture": True, "num_kv_heads": 3}),
     "32 attention heads over 3 KV heads"),
    # head_dim from a hidden size the heads do not divide (4 // 8 would be 0)
    (json.dumps(_LLAMA | {"hidden_size": 4, "num_attention_heads": 8, "num_key_value_heads": 8}),
     "hidden size 4 is not divisible by 8 attention heads; accepted: a multiple of the head count, or an explicit "
     "head_dim"),
    (json.dumps({"model_type": "gpt2", "n_embd": 100, "n_head": 12, "n_layer": 2, "vocab_size": 10,
                 "n_positions": 8}), "hidden size 100 is not divisible by 12 attention heads"),
    (json.dumps(_LLAMA | {"model_type": "falcon", "hidden_size": 100, "num_attention_heads": 12}),
     "hidden size 100 is not divisible by 12 attention heads"),
])
def test_bad_config_json_is_a_one_line_error(tmp_path, capsys, content, expected):
    path = tmp_path / "config.json"
    path.write_text(content)
    assert main_kv_calc([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err and str(path) in err


def test_unknown_name_is_a_one_line_error(capsys):
    assert main_kv_calc(["llama-9-1b"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'llama-9-1b'" in err and "llama-2-7b" in err and "gpt-3-175b" in err


def test_cli_through_python_m_harness(tmp_path):
    missing = tmp_path / "absent.json"
    run = subprocess.run([sys.executable, "-m", "harness", "kv-calc", str(missing)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.count("\n") == 1 and str(missing) in run.stderr


def test_published_table_is_current(tmp_path, capsys):
    assert main_kv_calc(["--all", "--publish", str(tmp_path)]) == 0
    written = (tmp_path / "kv_calc.md").read_text()
    assert "| llama-2-70b |" in written and "n_kv_heads=64 (the model has 8)" in written
    assert written == (ROOT / "results" / "kv_calc.md").read_text(), \
        "results/kv_calc.md is stale: run python -m harness kv-calc --all --publish results"
    assert publish(tmp_path) == tmp_path / "kv_calc.md"


def test_an_explicit_head_dim_needs_no_divisible_hidden_size(tmp_path):
    # Gemma-style: the heads' width is stated, not the hidden size split over the heads
    (tmp_path / "config.json").write_text(json.dumps(_LLAMA | {"hidden_size": 3072, "num_attention_heads": 16,
                                                               "num_key_value_heads": 16, "head_dim": 256}))
    arch = read_hf_config(tmp_path)
    assert (arch.head_dim, kv_bytes_per_token(arch, 16)) == (256, 2 * 2 * 16 * 256 * 2)


def test_context_lengths_are_an_option(capsys):
    table = memory_table([NAMED["llama-3-8b"]], {"32K": 32768})
    fp16 = table[table["dtype"] == "fp16/bf16"].iloc[0]
    assert fp16["KV 32K (GB)"] == pytest.approx(131_072 * 32_768 / 1e9)  # 128 KiB a token
    assert main_kv_calc(["llama-3-8b", "--context", "32K", "--context", "1000"]) == 0
    out = capsys.readouterr().out
    assert "KV 32K (GB)" in out and "KV 1,000 (GB)" in out and "KV 4K (GB)" not in out
    assert main_kv_calc(["llama-3-8b"]) == 0
    assert "KV 4K (GB)" in capsys.readouterr().out and "KV 128K (GB)" in memory_table([NAMED["llama-3-8b"]])


@pytest.mark.parametrize("value", ["0", "1.5K", "-4", "lots", "K"])
def test_bad_context_length_is_a_usage_error(capsys, value):
    assert main_kv_calc(["llama-3-8b", f"--context={value}"]) == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert f"argument --context: {value!r} is not a context length; accepted: a positive number of tokens" in error


def _published(path: Path) -> bool:
    return path.read_text().startswith("# KV-cache and weights calculator\n")


def test_publish_regenerates_an_existing_table_atomically(tmp_path, capsys):
    stale = tmp_path / "kv_calc.md"
    stale.write_text("# KV-cache and weights calculator\n\nan older table\n")
    for destination in (tmp_path, stale):  # the results directory, or the file itself
        assert main_kv_calc(["--publish", str(destination)]) == 0
        assert capsys.readouterr().out.endswith(f"wrote {stale}\n")
        assert _published(stale) and "an older table" not in stale.read_text()
        assert oct(stale.stat().st_mode & 0o777) == "0o644"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["kv_calc.md"]  # no temporary file left
    new = tmp_path / "deeper" / "tables.md"
    assert main_kv_calc(["--publish", str(new)]) == 0 and _published(new)


def test_publish_never_overwrites_another_file(tmp_path, capsys):
    notes = tmp_path / "notes.md"
    notes.write_text("my notes\n")
    for destination, expected in [
        (notes, f"kv-calc: {notes}: exists and is not a kv-calc table, so it is not overwritten; accepted: "),
        (notes / "table.md", f"kv-calc: cannot write {notes / 'table.md'} (File exists: {notes})"),
    ]:
        assert main_kv_calc(["--publish", str(destination)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(expected)
    assert notes.read_text() == "my notes\n" and sorted(tmp_path.iterdir()) == [notes]


def test_publish_to_an_empty_path_is_a_usage_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # Path("") would be the current directory
    assert main_kv_calc(["--publish", ""]) == 2
    assert "argument --publish: '' is empty; accepted: a results directory" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_publish_has_the_default_context_lengths(tmp_path, capsys):
    assert main_kv_calc(["--context", "32K", "--publish", str(tmp_path)]) == 2
    assert "--context and --publish: the published table has the default context lengths (4K and 128K)" \
        in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
