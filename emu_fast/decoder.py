"""EmuDecoder: the C++ decoder (emu_fast._C.EmuDecoder) plus a constructor from a Hugging Face
LLaMA, and the thin causal loop that drives it."""
from __future__ import annotations

import threading
from typing import Optional

import torch

from . import _C
from .packing import _body, pack_llama_layers
from .reference import LlamaShape


def check_llama_config(config) -> None:
    """What the decoder computes: plain LLaMA. Anything else is refused, not approximated."""
    problems = []
    if getattr(config, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={config.hidden_act!r} (needs 'silu')")
    scaling = getattr(config, "rope_scaling", None)
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type")) or params.get("rope_type", "default")
    if rope_type not in (None, "default"):
        problems.append(f"RoPE scaling {rope_type!r} (needs plain RoPE)")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            problems.append(f"{flag}=True")
    head_dim = getattr(config, "head_dim", None)
    if head_dim is not None and head_dim * config.num_attention_heads != config.hidden_size:
        problems.append(f"head_dim={head_dim} with {config.num_attention_heads} heads != hidden {config.hidden_size}")
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        problems.append(f"pretraining_tp={config.pretraining_tp}")
    if problems:
        raise TypeError("emu_fast: unsupported language-model config: " + "; ".join(problems))


class EmuDecoder(_C.EmuDecoder):
    __doc__ = _C.EmuDecoder.__doc__

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Each C++ call is serialized already; this keeps a whole generate() (prefill + decode)
        # from interleaving with another thread's.
        self._generate_lock = threading.Lock()

    @classmethod
    def from_llama(cls, lm, head_weight: torch.Tensor, up_weight: Optional[torch.Tensor] = None, *,
                   max_batch: int, max_seq_len: int) -> "EmuDecoder":
        """A decoder over a Hugging Face LlamaForCausalLM's body, with the given regression head
        (and Emu2's project_up). Packs QKV and gate/up in place (the model keeps working); no
        weight is copied. Allocates the KV cache for max_batch x max_seq_len."""
        check_llama_config(lm.config)
        shape = LlamaShape.from_hf(lm.config)
        return cls(
            pack_llama_layers(lm),
            _body(lm).norm.weight.detach(),
            head_weight.detach(),
            None if up_weight is None else up_weight.detach(),
            num_heads=shape.heads,
            num_kv_heads=shape.kv_heads,
            rms_eps=shape.eps,
            rope_theta=shape.rope_theta,
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

    @torch.no_grad()
    def generate(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, n: int) -> torch.Tensor:
        """The causal loop: prefill, then n-1 steps (in C++; a CUDA graph on the GPU), each fed
        the previous output. Returns [B, n, out]."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"emu_fast: n must be a positive int, got {n!r}")
        lens = attention_mask.sum(1) if attention_mask.dim() == 2 else None
        if lens is not None and int(lens.max()) + n - 1 > self.max_seq_len:
            raise ValueError(
                f"emu_fast: a prompt of {int(lens.max())} tokens plus {n - 1} generated embeddings "
                f"exceeds the decoder's max_seq_len of {self.max_seq_len}")
        with self._generate_lock:
            first = self.prefill(inputs_embeds, attention_mask)
            return torch.cat([first.unsqueeze(1), self.decode(first, n - 1)], dim=1)
