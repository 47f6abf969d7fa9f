"""Cross-implementation faults: one plausible mistake in reading a foreign checkpoint or in a family's conventions,
patched into the loader or the reference model; suites/test_cross_implementation.py compares with transformers."""
from __future__ import annotations

import torch
import transformers

import backends.checkpoint
import backends.families.gpt2
import backends.families.gpt_neox
import backends.torch_ref.attention
import backends.torch_ref.model

from . import Fault

# pytester's in-process runs unload the modules each run imported; transformers imports lazily, and a second import
# of its modules breaks save_pretrained. Import the classes the suite uses here, once, outside any run.
for _name in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Phi3ForCausalLM",
              "GPT2LMHeadModel", "GPTNeoXForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM"):
    getattr(transformers, _name)

SUITE = "suites/test_cross_implementation.py"
LOGITS_DIFFER = ("FAILED *test_cross_implementation.py::test_logits_match_transformers*{case}* - "
                 "*logits differ from transformers'*")
GREEDY_DIFFERS = ("FAILED *test_cross_implementation.py::test_greedy_matches_transformers*{case}* - "
                  "*differ from transformers'*")


def interleaved_rope(x, cos, sin):
    """GPT-J's convention (rotate pairs 2i, 2i+1) applied to half-split (Llama) tables: a classic port bug."""
    pairs = x.float().unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return (x.float() * cos + rotated * sin).to(x.dtype)


def rope_interleaved(monkeypatch):
    """RoPE rotates interleaved pairs (GPT-J) over half-split (Llama) tables."""
    monkeypatch.setattr(backends.torch_ref.model, "apply_rope", interleaved_rope)


def gpt2_k_before_q(monkeypatch):
    """GPT-2's fused c_attn split as k, q, v instead of q, k, v."""
    faithful = backends.families.gpt2.gpt2_weights

    def k_before_q(weights, config, source):
        out = faithful(weights, config, source)
        for name in [n for n in out if ".q_proj." in n]:
            k_name = name.replace(".q_proj.", ".k_proj.")
            out[name], out[k_name] = out[k_name], out[name]
        return out

    monkeypatch.setattr(backends.families.gpt2, "gpt2_weights", k_before_q)


def neox_qkv_blockwise(monkeypatch):
    """GPT-NeoX groups q, k, v by head; the fused rows are read as q|k|v blocks (Phi-3's layout)."""
    faithful = backends.families.gpt_neox.gpt_neox_weights

    def blockwise(weights, config, source):
        out = faithful(weights, config, source)
        for name, tensor in weights.items():
            if ".attention.query_key_value." in name:
                prefix = name.replace("gpt_neox.layers.", "model.layers.").replace("attention.query_key_value",
                                                                                    "self_attn")
                kind = name.rsplit(".", 1)[1]
                for proj, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0)):
                    out[prefix.rsplit(".", 1)[0] + f".{proj}.{kind}"] = part.contiguous()
        return out

    monkeypatch.setattr(backends.families.gpt_neox, "gpt_neox_weights", blockwise)


def neox_residual_swapped(monkeypatch):
    """use_parallel_residual read the wrong way round."""
    faithful = backends.families.gpt_neox.gpt_neox_config

    def swapped(hf, source):
        config = faithful(hf, source)
        return config.replace(parallel_residual=not config.parallel_residual)

    monkeypatch.setattr(backends.families.gpt_neox, "gpt_neox_config", swapped)


def qk_norm_not_applied(monkeypatch):
    """Qwen3's per-head q/k RMSNorm weights load, but the norms pass their input through."""
    attention = backends.torch_ref.model.SelfAttention
    faithful = attention.__init__

    def init_without_qk_norm(self, config, kernel):
        faithful(self, config, kernel)
        if config.qk_norm:
            self.q_norm.forward = self.k_norm.forward = lambda x: x

    monkeypatch.setattr(attention, "__init__", init_without_qk_norm)


def llama3_rope_as_linear(monkeypatch):
    """rope_scaling of type llama3 read as linear scaling."""
    monkeypatch.setitem(backends.checkpoint._HF_ROPE_KIND, "llama3", "linear")


def sliding_window_ignored(monkeypatch):
    """Every key visible in the sliding layers: right until the sequence outgrows the window (8 of 24 tokens)."""
    monkeypatch.setattr(backends.torch_ref.model, "within_window",
                        lambda allowed, query_positions, key_positions, window: allowed)


def softcap_ignored(monkeypatch):
    """Gemma 2's attention logit soft-capping is dropped."""
    monkeypatch.setattr(backends.torch_ref.model, "naive_attention",
                        lambda q, k, v, allowed, bias, scale, score_cap=None:
                        backends.torch_ref.attention.naive_attention(q, k, v, allowed, bias, scale))


def longrope_long_factors_never_used(monkeypatch):
    """LongRoPE never switches to its long divisors once a sequence passes the original context (32 of 24 + 32)."""
    faithful = backends.torch_ref.model.rope_frequencies
    monkeypatch.setattr(backends.torch_ref.model, "rope_frequencies", lambda config, seq_len: faithful(config, 1))


def fault(name: str, patch, selection: str, message: str, **outcomes: int) -> Fault:
    return Fault(name, "cross-implementation", patch.__doc__, SUITE, selection, message, patch=patch,
                 outcomes=outcomes)


FAULTS = [
    fault("rope-interleaved", rope_interleaved, "logits and (llama-gqa or qwen2 or gpt2)",
          LOGITS_DIFFER.format(case="llama-gqa"), failed=2, passed=1),  # GPT-2 has learned positions: no RoPE
    fault("gpt2-qkv-split-order", gpt2_k_before_q, "logits and gpt2", LOGITS_DIFFER.format(case="gpt2"), failed=1),
    fault("neox-qkv-blockwise", neox_qkv_blockwise, "logits and gpt-neox", LOGITS_DIFFER.format(case="gpt-neox"),
          failed=2),
    fault("neox-residual-swapped", neox_residual_swapped, "logits and gpt-neox",
          LOGITS_DIFFER.format(case="gpt-neox"), failed=2),
    fault("qk-norm-not-applied", qk_norm_not_applied, "logits and qwen3", LOGITS_DIFFER.format(case="qwen3"),
          failed=1),
    fault("llama3-rope-as-linear", llama3_rope_as_linear, "logits and llama3-rope",
          LOGITS_DIFFER.format(case="llama3-rope"), failed=1),
    fault("sliding-window-ignored", sliding_window_ignored, "logits and (gemma2 or gemma3 or window or llama-gqa)",
          LOGITS_DIFFER.format(case="window"), failed=4, passed=1),
    fault("softcap-ignored", softcap_ignored, "logits and gemma2", LOGITS_DIFFER.format(case="gemma2"), failed=1),
    fault("longrope-long-factors-unused", longrope_long_factors_never_used, "greedy and phi3-longrope",
          GREEDY_DIFFERS.format(case="phi3-longrope"), failed=2),
]
