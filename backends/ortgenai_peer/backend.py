"""onnxruntime-genai's Generator behind the adapter contract, registered as 'ortgenai'.

The model is what genai's own model builder makes of the checkpoint's Hugging Face directory (config.json, the
safetensors and the tokenizer it insists on), run offline once and kept in the exactbench cache directory, keyed by
fingerprint and strategy: fp32, or its int4 (symmetric blocks of 32 or 128 along the input dimension, accuracy
level 4: the MatMulNBits format of our int4-block32/128). A checkpoint without a tokenizer (a built-in model, saved
first, or a directory without tokenizer.json, its config and weights linked) gets a placeholder tokenizer, one word
per token id: the builder only copies it, and token ids go in, logits come out.

A cache is one Generator: genai derives every position from the tokens it holds, so a call's positions must
continue each row from its length (no explicit positions), every row holds as many tokens as the others and none is
padding (no token mask, no ragged rows). At batch 1, append_tokens takes chunks of any size and rewind_to rolls the
row back. At batch > 1 genai accepts append_tokens once per generator: later calls take one token per row, appended
by generate_next_token from logits set to choose exactly that token, and only a rollback to 0 exists.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from backends.base import Backend, KVCache, ModelRunner, UnsupportedModel, import_package
from backends.cache import cache_root
from backends.checkpoint import Checkpoint, hf_architecture, to_hf_config
from backends.registry import register
from backends.strategies import Attention, Batching, Quant, Strategy

BUILDER_PRECISIONS = {  # our strategy -> the model builder's precision and extra options (the same format; its
    Quant.FP32: ("fp32", []),  # deprecated int4_block_size was ignored: block 32 built for 128, so check_block_size)
    Quant.INT4_BLOCK32: ("int4", ["block_size=32", "accuracy_level=4"]),
    Quant.INT4_BLOCK128: ("int4", ["block_size=128", "accuracy_level=4"]),
}
BUILDER_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")  # RoPE decoders it lays out
FORCED = -1e9  # the logit of every token but the one a batch > 1 step appends


def import_genai():
    return import_package("onnxruntime_genai", "onnxruntime-genai")


def check_buildable(checkpoint: Checkpoint) -> None:
    """Refuse, in one line, what the model builder cannot read or would build differently from the checkpoint."""
    config = checkpoint.config
    arch = hf_architecture(to_hf_config(config))
    if arch not in BUILDER_ARCHITECTURES or config.rope_scaling or config.sliding_window or config.rotary_fraction != 1:
        raise UnsupportedModel(f"{checkpoint.name}: built here only for plain-RoPE {', '.join(BUILDER_ARCHITECTURES)} "
                               f"(not {arch}, rope scaling {config.rope_scaling and config.rope_scaling.kind}, sliding window "
                               f"{config.sliding_window}, rotary fraction {config.rotary_fraction})")


def builder_input(checkpoint: Checkpoint) -> Path:
    """The checkpoint's directory if it holds a tokenizer; else one under the cache with a placeholder tokenizer."""
    if checkpoint.directory is not None and (checkpoint.directory / "tokenizer.json").is_file():
        return checkpoint.directory
    directory = cache_root() / "ortgenai" / f"{checkpoint.name}-{checkpoint.fingerprint()}-hf"
    if checkpoint.directory is None:
        checkpoint.save(directory)
    else:  # linked afresh before each build: the directory may have moved since (a test's temporary directory)
        directory.mkdir(parents=True, exist_ok=True)
        for file in [checkpoint.directory / "config.json", *checkpoint.directory.glob("*.safetensors*")]:
            (directory / file.name).unlink(missing_ok=True)
            (directory / file.name).symlink_to(file.resolve())
    if not (directory / "tokenizer_config.json").is_file():
        from tokenizers import Tokenizer
        from tokenizers.models import WordLevel

        words = {f"<{i}>": i for i in range(checkpoint.config.vocab_size)}
        Tokenizer(WordLevel(words, unk_token="<0>")).save(str(directory / "tokenizer.json"))
        (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    return directory


def genai_model(checkpoint: Checkpoint, quant: Quant, threads: int | None = None):
    """onnxruntime-genai's Model of `checkpoint` under `quant`, built once by its model builder (offline, from the
    checkpoint's directory) into the exactbench cache directory; its session at `threads` intra-op threads if given
    (else genai's own rule: half the hardware threads)."""
    og = import_genai()
    check_buildable(checkpoint)
    out = cache_root() / "ortgenai" / f"{checkpoint.name}-{checkpoint.fingerprint()}-{quant.value}"
    if not (out / "genai_config.json").is_file():
        precision, extra = BUILDER_PRECISIONS[quant]
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as scratch:  # renamed into place whole: workers share it
            built = os.path.join(scratch, "model")
            command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(builder_input(checkpoint)),
                       "-o", built, "-p", precision, "-e", "cpu", "-c", os.path.join(scratch, "builder-cache")]
            run = subprocess.run(command + (["--extra_options", *extra] if extra else []), capture_output=True,
                                 text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            if run.returncode != 0:
                last = (run.stderr.strip().splitlines() or ["no output"])[-1]
                raise UnsupportedModel(f"{checkpoint.name}: onnxruntime-genai's model builder failed: {last}")
            check_block_size(os.path.join(built, "model.onnx"), quant)
            try:
                os.rename(built, out)
            except OSError:  # another worker built it first
                if not (out / "genai_config.json").is_file():
                    raise
    try:
        config = og.Config(str(out))
        if threads is not None:
            config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
        model = og.Model(config)
        og.Generator(model, og.GeneratorParams(model))  # genai checks its config here (e.g. the eos id in the vocabulary)
    except RuntimeError as error:
        raise UnsupportedModel(f"{checkpoint.name}: onnxruntime-genai refuses the built model: {error}") from None
    return model


def check_block_size(model_file: str, quant: Quant) -> None:
    """The builder skips options it does not know: check that every MatMulNBits has the strategy's block size."""
    import onnx

    blocks = {attribute.i for node in onnx.load(model_file, load_external_data=False).graph.node
              if node.op_type == "MatMulNBits" for attribute in node.attribute if attribute.name == "block_size"}
    expected = {int(option.split("=")[1]) for option in BUILDER_PRECISIONS[quant][1] if option.startswith("block_size=")}
    if blocks != expected:
        raise RuntimeError(f"onnxruntime-genai's model builder made MatMulNBits blocks {sorted(blocks)} for "
                           f"{quant.value}, not {sorted(expected)}")


class GenaiCache(KVCache):
    """One Generator for `batch_size` rows of `capacity` slots (genai's max_length), every row as long as the
    others; made on the first forward, when genai allocates its key/value buffers."""

    def __init__(self, runner: "GenaiRunner", batch_size: int, capacity: int):
        self.runner, self.batch_size, self._capacity = runner, batch_size, capacity
        self.generator = None
        self.length = 0

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def lengths(self) -> torch.Tensor:
        return torch.full((self.batch_size,), self.length, dtype=torch.long)

    def truncate(self, lengths: torch.Tensor) -> None:
        target = {int(n) for n in lengths}
        if len(target) != 1 or (self.batch_size > 1 and target != {0}) or max(target) > self.length:
            raise UnsupportedModel(f"onnxruntime-genai rolls back one row, or every row to 0, not to "
                                   f"{lengths.tolist()} at batch {self.batch_size} (capability cache-rollback)")
        if self.generator is not None:
            self.generator.rewind_to(target.pop())
        self.length = int(lengths[0])

    def reset(self, rows: torch.Tensor) -> None:
        if sorted(rows.tolist()) != list(range(self.batch_size)):
            raise UnsupportedModel("onnxruntime-genai's generator cannot empty single rows of a batch "
                                   "(capability batching:continuous)")
        self.truncate(torch.zeros(self.batch_size, dtype=torch.long))

    @property
    def allocated_bytes(self) -> int:
        """The present key and value buffers genai allocated (past and present share them)."""
        if self.generator is None:
            return 0
        return sum(np.asarray(self.generator.get_output(f"present.{layer}.{kind}")).nbytes
                   for layer in range(self.runner.config.n_layers) for kind in ("key", "value"))

    @property
    def element_bytes(self) -> int:
        return 4


class GenaiRunner(ModelRunner):
    def __init__(self, checkpoint: Checkpoint, strategy: Strategy):
        super().__init__(checkpoint, strategy)
        self.og = import_genai()
        self.model = genai_model(checkpoint, strategy.quant)

    @property
    def implementation(self) -> str:
        precision, extra = BUILDER_PRECISIONS[self.strategy.quant]
        return f"onnxruntime-genai {self.og.__version__} model builder {' '.join([precision, *extra])}"

    def new_generator(self, batch_size: int, max_length: int):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=max_length, batch_size=batch_size, do_sample=False)
        return self.og.Generator(self.model, params)

    def new_cache(self, batch_size: int, capacity: int) -> GenaiCache:
        if capacity > self.config.max_position_embeddings:  # the builder's context_length
            raise UnsupportedModel(f"onnxruntime-genai runs no further than the model's context length "
                                   f"{self.config.max_position_embeddings}, not a cache of {capacity} slots")
        return GenaiCache(self, batch_size, capacity)

    def forward(self, cache: KVCache, tokens, positions, token_mask=None):
        if not isinstance(cache, GenaiCache):
            raise TypeError(f"cache of type {type(cache).__name__} was not made by this runner")
        check_inputs(tokens, positions, token_mask, cache.length)
        cache.check_room(tokens.shape[1])
        if cache.generator is None:
            cache.generator = self.new_generator(cache.batch_size, cache.capacity)
        if cache.batch_size == 1 or cache.length == 0:
            cache.generator.append_tokens(tokens.numpy().astype(np.int32))
            logits = cache.generator.get_output("logits")
        else:
            logits = self.step_one_token(cache.generator, tokens)
        cache.length += tokens.shape[1]
        return torch.from_numpy(np.array(logits, dtype=np.float32))

    def step_one_token(self, generator, tokens: torch.Tensor):
        """(B, 1) tokens after the batch's one append_tokens: set logits that choose exactly them, let
        generate_next_token append them, and run the model on them (get_logits computes what is pending)."""
        if tokens.shape[1] != 1:
            raise UnsupportedModel(f"onnxruntime-genai appends tokens once per generator at batch > 1; later calls "
                                   f"take 1 token per row, not {tokens.shape[1]}")
        chosen = np.full((tokens.shape[0], self.config.vocab_size), FORCED, dtype=np.float32)
        chosen[np.arange(tokens.shape[0]), tokens[:, 0].numpy()] = 0.0
        generator.set_logits(chosen)
        generator.generate_next_token()
        appended = np.asarray(generator.get_next_tokens())
        if not np.array_equal(appended, tokens[:, 0].numpy()):  # a row genai counts as finished (eos) took no token
            raise UnsupportedModel(f"onnxruntime-genai appended {appended.tolist()}, not {tokens[:, 0].tolist()}")
        return generator.get_logits()

    def forward_full(self, tokens, positions, token_mask=None):
        check_inputs(tokens, positions, token_mask, 0)
        generator = self.new_generator(tokens.shape[0], tokens.shape[1])
        generator.append_tokens(tokens.numpy().astype(np.int32))
        return torch.from_numpy(np.array(generator.get_output("logits"), dtype=np.float32))


def check_inputs(tokens: torch.Tensor, positions: torch.Tensor, token_mask: torch.Tensor | None, length: int) -> None:
    """genai takes no positions and no padding: refuse what it would compute differently, naming the capability."""
    if token_mask is not None and not bool(token_mask.all()):
        raise UnsupportedModel("onnxruntime-genai takes no padding mask (capability padding-mask)")
    expected = torch.arange(length, length + tokens.shape[1]).expand_as(tokens)
    if not torch.equal(positions.cpu(), expected):
        raise UnsupportedModel(f"onnxruntime-genai places every row's tokens at positions {length}.."
                               f"{length + tokens.shape[1] - 1}, not {positions.tolist()} "
                               f"(capability explicit-positions)")


@register
class OrtGenaiBackend(Backend):
    name = "ortgenai"

    @classmethod
    def capabilities(cls) -> frozenset[str]:
        return frozenset([f"quant:{q.value}" for q in BUILDER_PRECISIONS]
                         + [f"attention:{Attention.NATIVE.value}", "position:rope", "kv-cache",
                            f"batching:{Batching.SEQUENTIAL.value}"])

    def load(self, checkpoint: Checkpoint, strategy: Strategy) -> GenaiRunner:
        self.check_strategy(strategy)
        return GenaiRunner(checkpoint, strategy)
