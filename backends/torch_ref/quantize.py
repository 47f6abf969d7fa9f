"""Quantization of the reference model as a module swap (gpt-fast style): each nn.Linear is replaced by a module
that holds the stored format (backends/quant/formats.py) and computes with it; the int8 KV cache is a cache class.

Which implementation runs each strategy (IMPLEMENTATION, also written into records and tables):
- int8-weight, int8-dynamic: torchao's Int8WeightOnlyConfig / Int8DynamicActivationInt8WeightConfig (what users
  run; an optional dependency: without torchao these strategies are refused, naming it). Their stored weights
  are the int8 per-channel format (codes and one scale per output channel).
- int4-block32/128, int4-gptq-block128, fp8: dequantize-then-matmul in fp32 (torchao's int4 needs a kernel
  library this CPU lacks, and torch's int4/int8 pack kernels were slower than fp32 GEMV here: DESIGN.md).
- int8-kv: fp32 weights; keys and values stored int8 with one fp32 scale per token and head, dequantized to fp32
  when read. fp16-kv: the same with keys and values stored fp16. The no-cache path rounds K/V the same way, so
  cached and uncached runs compute the same thing.
Every Linear is quantized, lm_head included (as ONNX Runtime quantizes every MatMul); embeddings stay fp32.

GPTQ (Frantar et al. 2022) picks the int4-block128 codes column by column, pushing each column's rounding error
onto the columns not yet quantized through the inverse Hessian of the layer's inputs. Here the Hessians come from
one fp32 pass over calibration windows of training text (harness/corpus.py's train split, never the held-out
documents), for all layers at once (not layer by layer on already-quantized inputs, as the paper does).
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from backends.cache import cache_root
from backends.base import UnsupportedModel
from backends.checkpoint import TOKENIZER_FILE, Checkpoint, ModelConfig, check_tokenizer
from backends.quant.formats import INT4_ZERO_POINT, Fp8Channels, Int4Blocks, Int8Channels, int4_block_scales, unpack_nibbles
from backends.strategies import Quant

from .model import TorchKVCache, write_slots

try:  # imported with the backend, once: torchao registers torch operator libraries that refuse a second import
    import torchao.quantization as torchao_quantization  # (pytester's in-process runs drop modules they imported)
except ImportError:
    torchao_quantization = None

INT4_BLOCKS = {Quant.INT4_BLOCK32: 32, Quant.INT4_BLOCK128: 128, Quant.INT4_GPTQ_BLOCK128: 128}
TORCHAO = {Quant.INT8_WEIGHT: "Int8WeightOnlyConfig", Quant.INT8_DYNAMIC: "Int8DynamicActivationInt8WeightConfig"}
IMPLEMENTATION = {
    **{q: f"torchao {config}" for q, config in TORCHAO.items()},
    **{q: "dequantize-then-matmul" for q in (*INT4_BLOCKS, Quant.FP8)},
    Quant.INT8_KV: "int8 cache, fp32 compute",
    Quant.FP16_KV: "fp16 cache, fp32 compute",
}
QUANTS = tuple(IMPLEMENTATION)
CALIBRATION_WINDOWS, CALIBRATION_LENGTH, CALIBRATION_SEED = 32, 256, 0
GPTQ_DAMPING = 0.01  # of the Hessian's mean diagonal, added for a stable inverse


class CalibrationUnavailable(UnsupportedModel):
    """A calibrated method was asked for and no calibration text can be made for the checkpoint."""


# --- quantized linears ---------------------------------------------------------------------------------------


class QuantizedLinear(nn.Module):
    """A Linear whose weight is held in a stored format; forward dequantizes in fp32 and multiplies."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def stored(self):
        """The stored format (backends/quant/formats.py) this layer computes with."""
        raise NotImplementedError  # every subclass below defines it; QuantizedLinear itself is never built

    def weight_fp32(self) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x):
        return F.linear(x, self.weight_fp32(), self.bias)


class Int4Linear(QuantizedLinear):
    def __init__(self, linear: nn.Linear, blocks: Int4Blocks):
        super().__init__(linear)
        self.block = blocks.block
        self.register_buffer("packed", blocks.packed)
        self.register_buffer("scales", blocks.scales)

    def stored(self) -> Int4Blocks:
        return Int4Blocks(self.packed, self.scales, self.block)

    def weight_fp32(self):
        codes = unpack_nibbles(self.packed).view(self.out_features, -1, self.block)  # (out, blocks, block)
        return ((codes.float() - INT4_ZERO_POINT) * self.scales[..., None]).view(self.out_features, self.in_features)


class Fp8Linear(QuantizedLinear):
    def __init__(self, linear: nn.Linear, weights: Fp8Channels):
        super().__init__(linear)
        self.register_buffer("values", weights.values)
        self.register_buffer("scales", weights.scales)

    def stored(self) -> Fp8Channels:
        return Fp8Channels(self.values, self.scales)

    def weight_fp32(self):
        return self.values.float() * self.scales


@dataclass
class LinearView:
    """What the kernel-exactness suite needs of one quantized linear: call it, and what it stores."""

    module: nn.Module
    stored: Int4Blocks | Int8Channels | Fp8Channels
    bias: torch.Tensor | None
    quantize_input: Callable[[torch.Tensor], Int8Channels] | None  # W8A8: the activation codes the kernel uses


def torchao_view(linear: nn.Linear) -> LinearView:
    """A torchao-quantized nn.Linear: its Int8Tensor weight stores int8 codes and one scale per output channel."""
    weight = linear.weight
    quantize_input = None
    if weight.act_quant_kwargs is not None:
        from torchao.quantization.quantize_.workflows.int8.int8_tensor import _choose_quant_func_and_quantize_tensor

        def quantize_input(x: torch.Tensor) -> Int8Channels:
            q = _choose_quant_func_and_quantize_tensor(x, weight.act_quant_kwargs)
            return Int8Channels(q.qdata, q.scale.reshape(*x.shape[:-1], 1))

    return LinearView(linear, Int8Channels(weight.qdata, weight.scale.reshape(-1, 1)), linear.bias, quantize_input)


def quantized_linears(model: nn.Module) -> dict[str, LinearView]:
    views = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            views[name] = LinearView(module, module.stored(), module.bias, None)
        elif isinstance(module, nn.Linear) and hasattr(module.weight, "qdata"):
            views[name] = torchao_view(module)
    return views


# --- the swap ------------------------------------------------------------------------------------------------


def layer_name(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, candidate in model.named_modules() if candidate is module)


def linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if isinstance(child, nn.Linear)]


def quantize_model(model: nn.Module, quant: Quant, checkpoint: Checkpoint) -> None:
    """Swap every Linear of the fp32 `model` for `quant`'s module, in place (fp32, bf16, fp16, int8-kv: nothing)."""
    if quant in TORCHAO:
        quantize_with_torchao(model, quant)
        return
    if quant in INT4_BLOCKS:
        block = INT4_BLOCKS[quant]
        if quant == Quant.INT4_GPTQ_BLOCK128:
            chosen = gptq_model(model, checkpoint, block)
            make = lambda name, linear: chosen[name]
        else:
            make = lambda name, linear: Int4Blocks.quantize(linear.weight.detach(), block)
        for parent, name, linear in linears(model):
            setattr(parent, name, Int4Linear(linear, make(layer_name(model, linear), linear)))
    elif quant == Quant.FP8:
        for parent, name, linear in linears(model):
            setattr(parent, name, Fp8Linear(linear, Fp8Channels.quantize(linear.weight.detach())))


def quantize_with_torchao(model: nn.Module, quant: Quant) -> None:
    if torchao_quantization is None:
        raise UnsupportedModel(f"{quant.value} runs torchao's {TORCHAO[quant]}, and torchao is not installed; "
                               "pip install torchao (the 'torchao' extra)")
    torchao_quantization.quantize_(model, getattr(torchao_quantization, TORCHAO[quant])())


def weight_bytes(model: nn.Module) -> dict[str, float]:
    """Bytes of every stored weight (scales included, a tied tensor once), and bits per weight over the linears."""
    views = {id(view.module): view for view in quantized_linears(model).values()}
    total, linear_bits, linear_weights, seen = 0, 0, 0, set()

    def tensor_bytes(tensor: torch.Tensor) -> int:
        if id(tensor) in seen:
            return 0
        seen.add(id(tensor))
        return tensor.numel() * tensor.element_size()

    for module in model.modules():
        if id(module) in views:  # its stored format, whatever tensors hold it
            stored = views[id(module)].stored.nbytes
            total += stored + (0 if module.bias is None else tensor_bytes(module.bias))
            linear_bits, linear_weights = linear_bits + 8 * stored, linear_weights + module.in_features * module.out_features
            continue
        if isinstance(module, nn.Linear):  # unquantized; a weight tied to the embedding is counted once
            total += tensor_bytes(module.weight) + (0 if module.bias is None else tensor_bytes(module.bias))
            linear_bits += 8 * module.weight.numel() * module.weight.element_size()
            linear_weights += module.weight.numel()
            continue
        total += sum(tensor_bytes(t) for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)])
    return {"weight_bytes": total, "bits_per_weight": linear_bits / linear_weights}


# --- GPTQ ----------------------------------------------------------------------------------------------------


def calibration_tokens(checkpoint: Checkpoint) -> torch.Tensor:
    """(CALIBRATION_WINDOWS, CALIBRATION_LENGTH) ids of training documents chosen with a fixed seed."""
    path = checkpoint.directory / TOKENIZER_FILE if checkpoint.directory else None
    if path is None or not path.exists():
        raise CalibrationUnavailable(f"{Quant.INT4_GPTQ_BLOCK128.value} needs calibration text, and checkpoint "
                                     f"{checkpoint.name!r} has no {TOKENIZER_FILE} to tokenize it with")
    from harness import corpus  # the training text every Python installation carries

    tokenizer = check_tokenizer(path, checkpoint.config)
    train, _ = corpus.split(corpus.documents())
    eos = tokenizer.token_to_id(corpus.EOS)
    ids: list[int] = []
    for doc in random.Random(CALIBRATION_SEED).sample(train, len(train)):
        ids.extend(tokenizer.encode(doc.text).ids + [eos])
        if len(ids) >= CALIBRATION_WINDOWS * CALIBRATION_LENGTH:
            break
    return torch.tensor(ids[: CALIBRATION_WINDOWS * CALIBRATION_LENGTH]).view(CALIBRATION_WINDOWS, -1)


@torch.inference_mode()
def input_hessians(model: nn.Module, tokens: torch.Tensor) -> dict[int, torch.Tensor]:
    """For each Linear (by id): 2/n X^T X over every calibration token's input to it, in float64."""
    from .model import full_sequence_context

    hessians: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}

    def accumulate(module, inputs, _output):
        x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
        key = id(module)
        hessians[key] = hessians.get(key, 0) + 2 * (x.T @ x).double()  # fp32 products, summed in fp64
        counts[key] = counts.get(key, 0) + x.shape[0]

    hooks = [linear.register_forward_hook(accumulate) for _, _, linear in linears(model)]
    try:
        for window in tokens.split(8):
            positions = torch.arange(window.shape[1]).expand_as(window)
            model(window, full_sequence_context(positions, torch.ones_like(window, dtype=torch.bool)))
    finally:
        for hook in hooks:
            hook.remove()
    return {key: hessian / counts[key] for key, hessian in hessians.items()}


GPTQ_CACHE_VERSION = "1"  # bump when the calibration text, the damping or the algorithm changes


def gptq_model(model: nn.Module, checkpoint: Checkpoint, block: int) -> dict[str, Int4Blocks]:
    """GPTQ's int4 blocks of every Linear, by layer name. Minutes of CPU, so the result is kept in the cache
    directory (safetensors) keyed by the checkpoint's fingerprint, the block and GPTQ_CACHE_VERSION; it is written
    under a temporary name and renamed once complete, so an interrupted run leaves nothing a later one reads."""
    from safetensors.torch import load_file, save_file


    path = cache_root() / "gptq" / f"{checkpoint.fingerprint()}-block{block}-v{GPTQ_CACHE_VERSION}.safetensors"
    names = [layer_name(model, linear) for _, _, linear in linears(model)]
    if path.exists():
        stored = load_file(str(path))
        if all(f"{name}.packed" in stored and f"{name}.scales" in stored for name in names):
            return {name: Int4Blocks(stored[f"{name}.packed"], stored[f"{name}.scales"], block) for name in names}
    hessians = input_hessians(model, calibration_tokens(checkpoint))
    chosen = {layer_name(model, linear): gptq_int4(linear.weight.detach(), hessians[id(linear)], block)
              for _, _, linear in linears(model)}
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    save_file({f"{name}.{part}": getattr(blocks, part).contiguous() for name, blocks in chosen.items()
               for part in ("packed", "scales")}, str(temporary))
    os.replace(temporary, path)
    return chosen


def gptq_blocks(checkpoint: Checkpoint, block: int = INT4_BLOCKS[Quant.INT4_GPTQ_BLOCK128]) -> dict[str, Int4Blocks]:
    """GPTQ's int4 blocks of the checkpoint's fp32 linears by layer name (cached): what onnxrt's
    int4-gptq-block128 stores and the harness's fp64 simulation of that format computes with."""
    from .backend import build_model

    return gptq_model(build_model(checkpoint), checkpoint, block)


def gptq_int4(weight: torch.Tensor, hessian: torch.Tensor, block: int) -> Int4Blocks:
    """The int4 block format of `weight`, codes chosen by GPTQ; each block's scale is set (by the format's own
    rule) from the block's weights as updated when the block is reached. Within a block the error is pushed
    column by column; onto later blocks in one product per block (the paper's lazy batch update)."""
    W = weight.double().clone()
    H = hessian.clone()
    dead = H.diagonal() == 0  # inputs never seen: their weights cannot matter
    H[dead, dead] = 1
    W[:, dead] = 0
    H += GPTQ_DAMPING * H.diagonal().mean() * torch.eye(len(H), dtype=H.dtype)
    H_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    scales = torch.empty(W.shape[0], W.shape[1] // block, dtype=torch.float32)
    dequantized = torch.empty_like(W)
    for start in range(0, W.shape[1], block):
        end = start + block
        columns, errors, H_block = W[:, start:end].clone(), torch.empty(W.shape[0], block, dtype=W.dtype), H_inv[start:end, start:end]
        scales[:, start // block] = int4_block_scales(columns, block)[:, 0]
        scale = scales[:, start // block].double()
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        for j in range(block):
            code = (torch.round(columns[:, j] / safe) + INT4_ZERO_POINT).clamp(0, 2 * INT4_ZERO_POINT - 1)
            dequantized[:, start + j] = (code - INT4_ZERO_POINT) * scale
            errors[:, j] = (columns[:, j] - dequantized[:, start + j]) / H_block[j, j]
            columns[:, j + 1:] -= errors[:, j:j + 1] * H_block[j, j + 1:][None, :]
        W[:, end:] -= errors @ H_inv[start:end, end:]
    return Int4Blocks.quantize(dequantized, block, scales)


# --- the quantized KV caches --------------------------------------------------------------------------------


def int8_round_trip(x: torch.Tensor) -> torch.Tensor:
    """(..., head_dim) -> the value its int8 storage (one scale per token and head) stands for, in fp32."""
    return Int8Channels.quantize(x).dequantize().to(x.dtype)


class Int8KVCache(TorchKVCache):
    """Keys and values as int8 codes with one fp32 scale per (layer, row, head, slot); read back in fp32.
    `quantize` (capability 'quantized-kv') is the quantizer it stores with: the exactness suite checks it."""

    quantize = staticmethod(Int8Channels.quantize)

    def __init__(self, config: ModelConfig, batch_size: int, capacity: int, device):
        super().__init__(config, batch_size, capacity, torch.int8, device)
        scale_shape = (*self.k.shape[:-1], 1)
        self.k_scales = torch.zeros(scale_shape, dtype=torch.float32, device=device)
        self.v_scales = torch.zeros(scale_shape, dtype=torch.float32, device=device)

    @property
    def allocated_bytes(self) -> int:
        scales = self.k_scales.numel() * 4 + self.v_scales.numel() * 4
        return super().allocated_bytes + scales

    @property
    def element_bytes(self) -> float:
        """1 byte per code plus the per-token-and-head fp32 scale spread over head_dim elements."""
        return 1 + 4 / self.k.shape[-1]

    def store(self, layer: int, slots: torch.Tensor, first_slot: int | None, k: torch.Tensor, v: torch.Tensor,
              seen: int):
        for codes, scales, new in ((self.k, self.k_scales, k), (self.v, self.v_scales, v)):
            stored = self.quantize(new)  # (B, Hkv, T, D) codes, (B, Hkv, T, 1) scales
            write_slots(codes[layer], slots, first_slot, stored.codes)
            write_slots(scales[layer], slots, first_slot, stored.scales)
        k_all = self.k[layer, :, :, :seen].float() * self.k_scales[layer, :, :, :seen]
        v_all = self.v[layer, :, :, :seen].float() * self.v_scales[layer, :, :, :seen]
        return k_all, v_all


def fp16_round_trip(x: torch.Tensor) -> torch.Tensor:
    """The value fp16 storage keeps of x, back in x's dtype."""
    return x.half().to(x.dtype)


class Fp16KVCache(TorchKVCache):
    """Keys and values stored fp16, read back in `compute_dtype` (fp32 here; fp64 in the harness's simulation)."""

    def __init__(self, config: ModelConfig, batch_size: int, capacity: int, device,
                 compute_dtype: torch.dtype = torch.float32):
        super().__init__(config, batch_size, capacity, torch.float16, device)
        self.compute_dtype = compute_dtype

    def store(self, layer: int, slots: torch.Tensor, first_slot: int | None, k: torch.Tensor, v: torch.Tensor,
              seen: int):
        k_all, v_all = super().store(layer, slots, first_slot, k, v, seen)
        return k_all.to(self.compute_dtype), v_all.to(self.compute_dtype)
