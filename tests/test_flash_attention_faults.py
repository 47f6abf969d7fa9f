"""The flash attention suite must catch planted faults: each faulty kernel is offered by a backend through
'attention-kernels', the suite runs on it with pytester, and the tests meant to catch the fault must fail by
the oracle, while the same tests pass on the correct kernels."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from backends.strategies import Attention
from backends.torch_ref.attention import IMPLEMENTATIONS, FlashAttention
from backends.torch_ref.backend import TorchBackend

pytest_plugins = ["pytester"]

SUITE = Path(__file__).resolve().parents[1] / "suites" / "test_flash_attention.py"


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


# fault -> (kernel, the suite's tests meant to catch it, how many of them run: one per dtype and case)
FAULTS = {
    "no-rescale": (NoRescaleFlash(), "test_seq_lengths and (1023 or 1025)", 6),
    "top-left-causal": (TopLeftCausalFlash(), "test_q_len_differs_from_k_len", 15),
    "scale-over-d": (ScaleOverDFlash(), "test_head_dims", 15),
}


def faulty_backend(fault: str) -> type[TorchBackend]:
    kernel = FAULTS[fault][0]

    class FaultyFlashBackend(TorchBackend):
        name = f"torch-fault-{fault}"

        def attention_kernels(self):
            return {**IMPLEMENTATIONS, Attention.FLASH: kernel}

    return FaultyFlashBackend


def run_suite(pytester: pytest.Pytester, backend: str, selection: str, results: Path):
    return pytester.inline_run(str(SUITE), "--backend", backend, "--attention", "flash", "-m", "exactness",
                               "-k", selection, "--results-dir", str(results), "-p", "no:cacheprovider")


@pytest.mark.parametrize("fault", list(FAULTS))
def test_suite_catches_planted_fault(pytester: pytest.Pytester, tmp_path: Path, fault: str, register_backend):
    _, selection, expected = FAULTS[fault]
    run = run_suite(pytester, register_backend(faulty_backend(fault)), selection, tmp_path)
    passed, skipped, failed = run.listoutcomes()
    assert len(failed) == expected and not passed and not skipped, (
        f"{fault}: {len(failed)} failed, {len(passed)} passed, {len(skipped)} skipped of {expected} meant to fail")
    for report in failed:
        assert f"[torch-fault-{fault}-flash-" in report.nodeid
        assert "exceeds 2.0 x plain error" in report.longreprtext, report.longreprtext[-500:]


def test_selections_pass_on_the_correct_kernel(pytester: pytest.Pytester, tmp_path: Path):
    """The control: the tests each fault fails pass on the torch backend's own flash kernel."""
    selection = " or ".join(f"({s})" for _, s, _ in FAULTS.values())
    run = run_suite(pytester, "torch", selection, tmp_path)
    passed, skipped, failed = run.listoutcomes()
    assert not failed and not skipped and len(passed) == sum(n for _, _, n in FAULTS.values())
