"""EmuDecoder: the C++ decoder (emu_fast._C.EmuDecoder) plus a constructor from a Hugging Face
LLaMA, and the thin causal loop that drives it."""
from __future__ import annotations

from typing import Optional

import torch

from . import _C
from .config import LlamaShape, check_llama_config
from .packing import llama_body_of, pack_llama_layers
from .rope import model_rope_tables, theta_rope_tables

# A KV cache for 4 prompts of up to 1024 tokens each (prompt + n outputs); Emu's prompts are
# tens to a few hundred tokens. Emu1-13B in bfloat16: 3.4 GB; pass other sizes to fit yours.
DEFAULT_MAX_BATCH = 4
DEFAULT_MAX_SEQ_LEN = 1024


class EmuDecoder(_C.EmuDecoder):
    __doc__ = _C.EmuDecoder.__doc__

    def __init__(self, layers, final_norm, head_weight, up_weight=None, *, num_heads, num_kv_heads, rms_eps,
                 max_batch=DEFAULT_MAX_BATCH, max_seq_len=DEFAULT_MAX_SEQ_LEN, rope_cos=None, rope_sin=None,
                 rope_theta=None):
        # By hand, without a model: tables from rope_theta (from_llama takes the model's own).
        if rope_cos is None and rope_sin is None:
            head_dim = final_norm.shape[0] // num_heads
            rope_cos, rope_sin = theta_rope_tables(head_dim, 2 * max_seq_len, 10000.0 if rope_theta is None else rope_theta,
                                                   final_norm.device)
        elif rope_theta is not None:
            raise ValueError("emu_fast.EmuDecoder: pass either rope_cos/rope_sin or rope_theta, not both")
        super().__init__(layers, final_norm, head_weight, up_weight, num_heads=num_heads, num_kv_heads=num_kv_heads,
                         rms_eps=rms_eps, rope_cos=rope_cos, rope_sin=rope_sin, max_batch=max_batch,
                         max_seq_len=max_seq_len)

    @classmethod
    def from_llama(cls, lm, head_weight: torch.Tensor, up_weight: Optional[torch.Tensor] = None, *,
                   max_batch: int = DEFAULT_MAX_BATCH, max_seq_len: int = DEFAULT_MAX_SEQ_LEN) -> "EmuDecoder":
        """A decoder over a Hugging Face LlamaForCausalLM's body, with the given regression head
        (and Emu2's project_up). Packs QKV and gate/up in place (the model keeps working); no
        weight is copied. Allocates the KV cache for max_batch prompts of up to max_seq_len
        tokens each (prompt + generated embeddings). RoPE comes from the model's own rotary
        module (emu_fast.rope), so a model whose frequencies were rounded runs as it is."""
        check_llama_config(lm.config)
        shape = LlamaShape.from_hf(lm.config)
        if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 1:
            raise ValueError(f"emu_fast: max_seq_len must be a positive int, got {max_seq_len!r}")
        rope_cos, rope_sin = model_rope_tables(lm, 2 * max_seq_len, shape.head_dim)
        return cls(
            pack_llama_layers(lm),
            llama_body_of(lm).norm.weight.detach(),
            head_weight.detach(),
            None if up_weight is None else up_weight.detach(),
            num_heads=shape.heads,
            num_kv_heads=shape.kv_heads,
            rms_eps=shape.eps,
            rope_cos=rope_cos,
            rope_sin=rope_sin,
            max_batch=max_batch,
            max_seq_len=max_seq_len,
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.kv_cache.dtype

    @property
    def device(self) -> torch.device:
        return self.kv_cache.device

    @property
    def kv_cache_bytes(self) -> int:
        return self.kv_cache.numel() * self.kv_cache.element_size()

    def generate(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, n: int) -> torch.Tensor:
        """The causal loop, in C++ under one lock: prefill, then n-1 steps (a CUDA graph on the
        GPU), each fed the previous output. Returns [B, n, out]."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"emu_fast: n must be a positive int, got {n!r}")
        # The prompts, the mask and every prompt's room for n - 1 steps are checked in C++
        # (csrc/prompt_mask.cpp, EmuDecoder::generate) before anything runs.
        return super().generate(inputs_embeds, attention_mask, n)
