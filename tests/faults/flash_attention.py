"""Flash-attention faults: a faulty kernel offered by a backend through `attention_kernels`;
suites/test_flash_attention.py judges it by the oracle (at most 2x the plain low-precision error against fp64)."""
from __future__ import annotations

import torch

from backends.strategies import Attention
from backends.torch_ref.attention import IMPLEMENTATIONS, FlashAttention
from backends.torch_ref.backend import TorchBackend

from . import Fault

SUITE = "suites/test_flash_attention.py"
FLASH = ("--attention", "flash")
ORACLE_FAILURE = "FAILED *test_flash_attention.py::test_{test}* - AssertionError: *optimized error * exceeds 2.0 x*"


class NoRescaleFlash(FlashAttention):
    """The running sum is not rescaled when the max changes (the output accumulator still is)."""

    @staticmethod
    def update(m, l, acc, scores, v_tile):
        m_new = torch.maximum(m, scores.amax(dim=-1))
        shift = m_new.masked_fill(m_new == -torch.inf, 0.0)
        rescale = torch.exp(m - shift)
        p = torch.exp(scores - shift[..., None])
        l = l + p.sum(dim=-1)  # the fault: l * rescale + p.sum(dim=-1)
        acc = acc * rescale[..., None] + p.to(v_tile.dtype).to(p.dtype) @ v_tile.to(p.dtype)
        return m_new, l, acc


class TopLeftCausalFlash(FlashAttention):
    """Takes the keys' padding from the mask but applies its own causal mask, aligned top left (query i sees
    keys <= i) instead of bottom right (the last query sees every key), as kernels with a causal flag did."""

    def __call__(self, q, k, v, allowed, bias, scale):
        key_valid = allowed.any(dim=-2, keepdim=True)  # (B, 1 or H, 1, S)
        top_left = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril()
        return super().__call__(q, k, v, key_valid & top_left, bias, scale)


class ScaleOverDFlash(FlashAttention):
    """Softmax scale 1/d instead of 1/sqrt(d)."""

    def __call__(self, q, k, v, allowed, bias, scale):
        return super().__call__(q, k, v, allowed, bias, 1.0 / q.shape[-1])


class DropsPartialKeyTileFlash(FlashAttention):
    """The number of key tiles is floor-divided: keys past the last whole tile are never visited (when there is a
    whole tile at all)."""

    def __call__(self, q, k, v, allowed, bias, scale):
        whole = k.shape[2] // self.block_k * self.block_k or k.shape[2]
        bias = None if bias is None else bias[..., :whole]
        return super().__call__(q, k[:, :, :whole], v[:, :, :whole], allowed[..., :whole], bias, scale)


def kernel_backend(name: str, kernel: FlashAttention) -> type[TorchBackend]:
    """The reference backend with `kernel` as its flash attention."""
    return type(f"Planted{type(kernel).__name__}", (TorchBackend,),
                {"name": name, "attention_kernels": lambda self: {**IMPLEMENTATIONS, Attention.FLASH: kernel}})


def flash_fault(name: str, kernel: FlashAttention, selection: str, test: str, failed: int, passed: int = 0) -> Fault:
    """`failed`: how many tests of the selection (one per dtype and case) must fail, `passed` how many pass."""
    return Fault(name, "flash-attention", type(kernel).__doc__, SUITE, selection, ORACLE_FAILURE.format(test=test),
                 backend=kernel_backend(name, kernel), args=FLASH, outcomes={"failed": failed, "passed": passed})


FAULTS = [
    flash_fault("flash-no-rescale", NoRescaleFlash(), "test_seq_lengths and (1023 or 1025)", "seq_lengths", 6),
    flash_fault("flash-top-left-causal", TopLeftCausalFlash(), "test_q_len_differs_from_k_len", "q_len_differs", 15),
    flash_fault("flash-scale-over-d", ScaleOverDFlash(), "test_head_dims", "head_dims", 15),
    # 1023 keys lose 255 in every dtype; 1025 lose one key, seen by the last query alone: about 1/1025 of its output,
    # inside bf16's and fp16's rounding (2x their plain error), so only fp32 sees it there
    flash_fault("flash-drops-partial-key-tile", DropsPartialKeyTileFlash(), "test_seq_lengths and (1023 or 1025)",
                "seq_lengths", failed=4, passed=2),
]
