"""Quality of the embedded models on the held-out corpus (harness/corpus.py, harness/quality.py).

bench tier: perplexity of the target and of each draft, and each draft's top-1 agreement with the target
(the rate at which a greedy draft proposes the target's own token: it bounds greedy speculative acceptance).
The draft distilled from the target (default-draft) is measured beside the same draft trained on hard labels
(default-draft-nodistill). Each record also carries the model's size and how long it took to train.
"""
from __future__ import annotations

import re

import pytest

from backends.checkpoint import TOKENIZER_FILE, check_tokenizer
from backends.strategies import Quant, Strategy
from backends.torch_ref.model import Transformer
from harness import corpus
from harness.models import EMBEDDED_MODELS, resolve_model
from harness.quality import evaluation_windows, next_token_stats, perplexity, same_top1
from harness.training import CONTEXT, LOG_FILE

TARGET = "default-target"
DRAFTS = ["default-draft", "default-draft-nodistill"]
MIN_HELDOUT_TOKENS = 100_000  # the floor for the evaluation set


@pytest.fixture(scope="session")
def quality_cache():
    """Checkpoints, the evaluation windows and each (backend, model)'s statistics, computed once per session."""
    return {}


def checkpoint_of(cache: dict, name: str):
    if name not in cache:
        cache[name] = resolve_model(name)
    return cache[name]


def windows_of(cache: dict):
    if "windows" not in cache:
        tokenizer = check_tokenizer(EMBEDDED_MODELS[TARGET] / TOKENIZER_FILE, checkpoint_of(cache, TARGET).config)
        cache["windows"] = evaluation_windows(tokenizer, CONTEXT)
    return cache["windows"]


def stats_of(cache: dict, load_runner, backend, name: str):
    key = (backend.name, name)
    if key not in cache:
        runner = load_runner(checkpoint_of(cache, name), Strategy(Quant.FP32))
        cache[key] = next_token_stats(runner, windows_of(cache))
    return cache[key]


def training_figures(name: str) -> dict[str, float]:
    """Wall (and, where logged, CPU) seconds from the last line of the model's training log (harness/training.py)."""
    last = (EMBEDDED_MODELS[name] / LOG_FILE).read_text().splitlines()[-1]
    wall, cpu = re.search(r"(?:wall|in) (\d+)s", last), re.search(r"cpu (\d+)s", last)
    return {"train_wall_s": float(wall[1]), **({"train_cpu_s": float(cpu[1])} if cpu else {})}


@pytest.mark.bench
@pytest.mark.parametrize("model", [TARGET, *DRAFTS])
def test_heldout_quality(backend, load_runner, model, quality_cache, record):
    directory = EMBEDDED_MODELS[model]
    if model != TARGET:  # agreement is only meaningful over one tokenization
        same = (directory / TOKENIZER_FILE).read_bytes() == (EMBEDDED_MODELS[TARGET] / TOKENIZER_FILE).read_bytes()
        assert same, f"{directory / TOKENIZER_FILE} differs from the target's tokenizer"
    windows = windows_of(quality_cache)
    assert windows.numel() >= MIN_HELDOUT_TOKENS, f"held-out set has {windows.numel()} tokens, fewer than {MIN_HELDOUT_TOKENS}"
    stats = stats_of(quality_cache, load_runner, backend, model)
    ppl = perplexity(stats)
    checkpoint = checkpoint_of(quality_cache, model)
    record.params(corpus=corpus.corpus_fingerprint(corpus.split(corpus.documents())[1]), python=corpus.python_version())
    record(ppl=ppl.value, ppl_err=ppl.error, scored_tokens=len(stats.nll), heldout_tokens=windows.numel(),
           parameters=sum(p.numel() for p in Transformer(checkpoint.config).parameters()),
           weights_bytes=sum(f.stat().st_size for f in directory.glob("*.safetensors")), **training_figures(model))
    if model != TARGET:
        agreement = same_top1(stats, stats_of(quality_cache, load_runner, backend, TARGET))
        record(same_top1=agreement.value, same_top1_err=agreement.error)
    # a trained model must beat guessing uniformly over its vocabulary by far
    assert ppl.value < checkpoint.config.vocab_size / 10, f"{model}: held-out perplexity {ppl.value:.1f}"
