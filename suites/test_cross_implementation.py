"""Cross-implementation: the backend under test against Hugging Face transformers on the same checkpoint.

The `--model` checkpoint is compared first (test ids `model-<name>`): a local directory is loaded by transformers
as it is; a built-in model is saved as a Hugging Face directory first. A checkpoint transformers has no class
for (the reference model's own layouts, ExactbenchDecoder) is skipped, naming why.

The built-in configuration matrix (marker `config_matrix`; `-m "not config_matrix"` leaves it out): each
supported family is built offline by transformers itself from a small random configuration, its
weights re-drawn so that every tensor (biases and norms included) matters, and saved with save_pretrained;
the reference model loads that directory through the checkpoint loader (names, fused q/k/v, transposed
Conv1D) and runs it on the backend under test (the reference by default); transformers loads it as it would
any checkpoint. The embedded models are compared too.
fp32 logits must agree within FP32_RELATIVE of the largest |logit| transformers produced (an fp32 sum's rounding
grows with the magnitude of what it sums, so a fixed bound that holds on logits of +-10 fails on a trained
model's +-40); greedy tokens must be identical over 32 steps, with and without the cache.
transformers is an optional test dependency: without it the suite skips, saying so.
"""
from __future__ import annotations

import inspect
import json
import math

import pytest
import torch

from backends.checkpoint import hf_architecture, load_checkpoint
from backends.algorithms.generation import generate
from backends.strategies import Quant, Strategy
from harness.models import EMBEDDED_MODELS
from harness.oracles import first_mismatch, max_abs_error
from harness.plugin import SESSION

transformers = pytest.importorskip("transformers", reason="transformers (an optional test dependency) is not installed")

# fp32 logits: max |ours - theirs| <= FP32_RELATIVE * max |their logits|, about 32 fp32 ulps of the largest logit;
# the cases here measure at most 7.5e-7 (6 ulps), but Gemma 2's 1.7e-6 (its logits capped at 4: the cap shrinks
# the largest logit more than the error); every planted convention fault of tests/faults/cross_implementation.py
# exceeds it
FP32_RELATIVE = 4e-6
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
    # Llama 3.1's scaling: with head_dim 16 and an original context of 32, some wavelengths are kept (< 8), some
    # blended, some interpolated (> 32)
    "llama3-rope": ("LlamaConfig", "LlamaForCausalLM",
                    dict(SMALL, num_key_value_heads=2, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                                     "original_max_position_embeddings": 32})),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(SMALL, num_key_value_heads=2, head_dim=16)),
    # fused qkv_proj and gate_up_proj; RoPE on half of each head; a sliding window of 8 on every layer
    "phi3-partial-rotary-window": ("Phi3Config", "Phi3ForCausalLM",
                            dict(SMALL, num_key_value_heads=2, sliding_window=8, pad_token_id=0, bos_token_id=0,
                                 eos_token_id=0, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                                  "partial_rotary_factor": 0.5})),
    # LongRoPE: short divisors up to 32 positions, long ones past it (the 44-token sequences cross it)
    "phi3-longrope": ("Phi3Config", "Phi3ForCausalLM",
                      dict(SMALL, num_key_value_heads=2, sliding_window=None, pad_token_id=0, bos_token_id=0,
                           eos_token_id=0, original_max_position_embeddings=32,
                           rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                            "original_max_position_embeddings": 32,
                                            "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.0, 3.5],
                                            "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 8.0, 10.0, 12.0]})),
    # parallel residual, RoPE on a quarter of each head, q/k/v fused per head, exact GELU
    "gpt-neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(SMALL, bos_token_id=0, eos_token_id=0)),
    "gpt-neox-sequential": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                            dict(SMALL, bos_token_id=0, eos_token_id=0, use_parallel_residual=False)),
    # sliding windows of 8 positions, shorter than the 44-token sequences: layer 0 slides, layer 1 is global.
    # Soft-caps small enough to bite on these logits and scores
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(SMALL, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=32, sliding_window=8,
                    attn_logit_softcapping=3.0, final_logit_softcapping=4.0)),
    # Gemma 3: q/k norms; the sliding layer has its own RoPE base, the global one a linear scaling
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(SMALL, num_key_value_heads=2, head_dim=16, sliding_window=8,
                    layer_types=["sliding_attention", "full_attention"],
                    rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100000.0},
                                     "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}})),
    "mistral-sliding-window": ("MistralConfig", "MistralForCausalLM", dict(SMALL, num_key_value_heads=2, sliding_window=8)),
}
MODEL = "--model"  # the case of the user's checkpoint


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
            built[family] = tmp_path_factory.mktemp(family, numbered=False)  # the directory names the model
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


def pytest_generate_tests(metafunc):
    """The --model checkpoint, then the configuration matrix (the embedded models the --model is not)."""
    if "case" not in metafunc.fixturenames:
        return
    model = metafunc.config.stash[SESSION].model.name
    matrix = [*FAMILIES, *(name for name in EMBEDDED_MODELS if name != model)]
    metafunc.parametrize("case", [pytest.param(MODEL, id=f"model-{model}"),
                                  *(pytest.param(name, marks=pytest.mark.config_matrix) for name in matrix)])


@pytest.fixture
def case_checkpoint(case, checkpoint, checkpoints, family_dir):
    """The case's Checkpoint, loaded once: the --model checkpoint itself, or a matrix directory through the loader."""
    if case == MODEL:
        return checkpoint
    directory = EMBEDDED_MODELS[case] if case in EMBEDDED_MODELS else family_dir(case)
    if directory not in checkpoints:
        checkpoints[directory] = load_checkpoint(directory)
    return checkpoints[directory]


@pytest.fixture
def model_dir(case_checkpoint, tmp_path_factory):
    """A Hugging Face directory of the case's checkpoint that transformers has a class for; a built-in model
    without a directory is saved as one."""
    directory = case_checkpoint.directory
    if directory is None:
        directory = tmp_path_factory.mktemp("built-in") / case_checkpoint.name  # the directory names the model
        case_checkpoint.save(directory)
    arch = hf_architecture(json.loads((directory / "config.json").read_text()))
    if not hasattr(transformers, arch):
        pytest.skip(f"{case_checkpoint.name}: transformers has no class for its layout ({arch})")
    return directory


@pytest.fixture
def runner(case_checkpoint, model_dir, load_runner):
    """The backend under test, fp32, on the checkpoint transformers reads from model_dir."""
    return load_runner(case_checkpoint, Strategy(Quant.FP32))


def within_fp32_bound(ours: torch.Tensor, theirs: torch.Tensor, record) -> tuple[bool, str]:
    """max |ours - theirs| against FP32_RELATIVE * max |theirs|; both are recorded."""
    error, scale = max_abs_error(ours, theirs), float(theirs.abs().max())
    record(max_abs_logit_error=error, max_abs_logit=scale, relative_logit_error=error / scale)
    return error <= FP32_RELATIVE * scale, f"{error:.3g} (bound {FP32_RELATIVE:g} * max |logit| {scale:.3g})"


@pytest.mark.exactness
def test_logits_match_transformers(runner, model_dir, record):
    model = hf_model(model_dir)
    tokens = torch.tensor([prompt_for(runner.config.vocab_size) * 2])  # 24 tokens
    positions = torch.arange(tokens.shape[1])[None]
    ours = runner.forward_full(tokens, positions)
    with torch.inference_mode():
        theirs = model(input_ids=tokens).logits.float()
    within, measured = within_fp32_bound(ours, theirs, record)
    assert within, f"{model_dir.name}: logits differ from transformers' by {measured}"


@pytest.mark.exactness
@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
def test_greedy_matches_transformers(runner, model_dir, use_cache, record):
    model = hf_model(model_dir)
    prompt = prompt_for(runner.config.vocab_size)
    ours = generate(runner, [prompt], N_GREEDY, use_cache=use_cache)
    their_tokens, their_logits = hf_greedy(model, prompt, N_GREEDY, use_cache)
    within, measured = within_fp32_bound(ours.logits[0], their_logits, record)
    mismatch = first_mismatch(ours.tokens[0], their_tokens)
    record(first_mismatch=-1 if mismatch is None else mismatch)
    assert mismatch is None, f"{model_dir.name}: greedy tokens differ from transformers' at step {mismatch}"
    assert within, f"{model_dir.name}: step logits differ from transformers' by {measured}"
