"""Cross-implementation: the reference PyTorch model against Hugging Face transformers on the same checkpoint.

Each supported family is built offline by transformers itself from a small random configuration, its
weights re-drawn so that every tensor (biases and norms included) matters, and saved with save_pretrained;
the reference model loads that directory through the checkpoint loader (names, fused q/k/v, transposed
Conv1D) and runs it on the backend under test (the reference by default); transformers loads it as it would
any checkpoint. The embedded default models are compared too.
fp32 logits must agree within 1e-5; greedy tokens must be identical over 32 steps, with and without the cache.
transformers is an optional test dependency: without it the suite skips, saying so.
"""
from __future__ import annotations

import inspect
import json
import math

import pytest
import torch

from backends.checkpoint import hf_architecture, load_checkpoint
from backends.generation import generate
from backends.strategies import Quant, Strategy
from harness.models import EMBEDDED_MODELS
from harness.oracles import first_mismatch, max_abs_error

transformers = pytest.importorskip("transformers", reason="transformers (an optional test dependency) is not installed")

FP32_ATOL = 1e-5  # the bound on fp32 logits
N_GREEDY = 32
PROMPT_LENGTH = 12
SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=128)
# family id -> (config class, model class, config keywords): every layout the loader translates
FAMILIES = {
    "llama-gqa": ("LlamaConfig", "LlamaForCausalLM", dict(SMALL, num_key_value_heads=2)),
    "llama-bias-mqa": ("LlamaConfig", "LlamaForCausalLM", dict(SMALL, num_key_value_heads=1, attention_bias=True)),
    "llama-tied-headdim": ("LlamaConfig", "LlamaForCausalLM", dict(SMALL, num_key_value_heads=2, head_dim=32,
                                                                   tie_word_embeddings=True)),
    "llama-rope-linear": ("LlamaConfig", "LlamaForCausalLM",
                          dict(SMALL, num_key_value_heads=2, rope_scaling={"rope_type": "linear", "factor": 4.0})),
    # dynamic NTK rescales once the sequence outgrows max_position_embeddings: 12 + 32 tokens pass 24
    "llama-rope-dynamic": ("LlamaConfig", "LlamaForCausalLM",
                           dict(SMALL, num_key_value_heads=2, max_position_embeddings=24,
                                rope_scaling={"rope_type": "dynamic", "factor": 4.0})),
    "llama-rope-yarn": ("LlamaConfig", "LlamaForCausalLM",
                        dict(SMALL, num_key_value_heads=2, rope_theta=500.0,
                             rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32})),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(SMALL, num_key_value_heads=2, sliding_window=None)),
    "qwen2-tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(SMALL, num_key_value_heads=2, tie_word_embeddings=True)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                                          bos_token_id=0, eos_token_id=0)),
}


def redraw_weights(model: torch.nn.Module, seed: int) -> None:
    """Seeded weights far from transformers' init (zero biases, unit norms would hide a misplaced tensor), scaled
    so that logits stay within about +-10 as a trained model's do: 1e-5 is then a relative error near 1e-6."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.dim() == 1:  # norm weights around 1, biases and norm biases around 0
                is_norm_weight = ("ln_" in name or "norm" in name) and name.endswith("weight")
                param.copy_((1.0 if is_norm_weight else 0.0) + 0.1 * noise)
            elif "embed" in name or "wte" in name or "wpe" in name:  # a tied head multiplies by these
                param.copy_(0.25 * noise)
            else:  # Linear is (out, in), GPT-2's Conv1D (in, out): either way scale by the input width
                fan_in = param.shape[0] if ".c_" in name else param.shape[1]
                param.copy_(noise / math.sqrt(fan_in))


@pytest.fixture(scope="session")
def family_dir(tmp_path_factory):
    """family id -> a Hugging Face directory written by transformers (built once per session)."""
    built = {}

    def build(family: str):
        if family not in built:
            config_class, model_class, keywords = FAMILIES[family]
            config = getattr(transformers, config_class)(**keywords)
            model = getattr(transformers, model_class)(config)
            redraw_weights(model, seed=sorted(FAMILIES).index(family))
            built[family] = tmp_path_factory.mktemp(family)
            model.save_pretrained(built[family])
        return built[family]

    return build


def hf_model(directory):
    """The directory loaded by the transformers class its config.json names, fp32, eager attention."""
    arch = hf_architecture(json.loads((directory / "config.json").read_text()))
    model = getattr(transformers, arch).from_pretrained(directory, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


@torch.inference_mode()
def hf_greedy(model, prompt: list[int], steps: int, use_cache: bool) -> tuple[list[int], torch.Tensor]:
    """Greedy decoding through transformers' forward: with its own KV cache, or re-running the whole sequence."""
    # transformers 5.2x renamed past_key_values to cache, in the forward's arguments and in its output
    cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    ids = torch.tensor([prompt])
    new, past, logits, tokens = ids, None, [], []
    for _ in range(steps):
        out = model(input_ids=new if use_cache else ids, use_cache=use_cache, **{cache_name: past})
        step = out.logits[:, -1].float()
        chosen = step.argmax(-1, keepdim=True)
        logits.append(step[0])
        tokens.append(int(chosen))
        ids = torch.cat([ids, chosen], dim=1)
        new, past = chosen, (getattr(out, cache_name) if use_cache else None)
    return tokens, torch.stack(logits)


def prompt_for(vocab_size: int) -> list[int]:
    return torch.randint(0, vocab_size, (PROMPT_LENGTH,), generator=torch.Generator().manual_seed(7)).tolist()


@pytest.fixture(scope="session")
def checkpoints():
    """directory -> its Checkpoint, loaded once (the runner cache is keyed by checkpoint)."""
    return {}


@pytest.fixture(params=[*FAMILIES, *EMBEDDED_MODELS])
def model_dir(request, family_dir):
    if request.param in EMBEDDED_MODELS:
        return EMBEDDED_MODELS[request.param]
    return family_dir(request.param)


@pytest.fixture
def runner(model_dir, checkpoints, load_runner):
    """The backend under test, fp32, on the directory the loader read."""
    if model_dir not in checkpoints:
        checkpoints[model_dir] = load_checkpoint(model_dir)
    return load_runner(checkpoints[model_dir], Strategy(Quant.FP32))


@pytest.mark.exactness
def test_logits_match_transformers(runner, model_dir, record):
    model = hf_model(model_dir)
    tokens = torch.tensor([prompt_for(runner.config.vocab_size) * 2])  # 24 tokens
    positions = torch.arange(tokens.shape[1])[None]
    ours = runner.forward_full(tokens, positions)
    with torch.inference_mode():
        theirs = model(input_ids=tokens).logits.float()
    error = max_abs_error(ours, theirs)
    record(max_abs_logit_error=error)
    assert error <= FP32_ATOL, f"{model_dir.name}: logits differ from transformers' by {error:.3g}"


@pytest.mark.exactness
@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
def test_greedy_matches_transformers(runner, model_dir, use_cache, record):
    model = hf_model(model_dir)
    prompt = prompt_for(runner.config.vocab_size)
    ours = generate(runner, [prompt], N_GREEDY, use_cache=use_cache)
    their_tokens, their_logits = hf_greedy(model, prompt, N_GREEDY, use_cache)
    error = max_abs_error(ours.logits[0], their_logits)
    mismatch = first_mismatch(ours.tokens[0], their_tokens)
    record(max_abs_logit_error=error, first_mismatch=-1 if mismatch is None else mismatch)
    assert mismatch is None, f"{model_dir.name}: greedy tokens differ from transformers' at step {mismatch}"
    assert error <= FP32_ATOL, f"{model_dir.name}: step logits differ from transformers' by {error:.3g}"
