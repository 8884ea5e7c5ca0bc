"""The LLaMA shape emu_fast reads off a Hugging Face config, and the checks that say whether
emu_fast can run it. Shared by the decoder, the reference and the benchmark."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LlamaShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    eps: float = 1e-6
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @classmethod
    def from_hf(cls, config) -> "LlamaShape":
        return cls(
            hidden=config.hidden_size,
            layers=config.num_hidden_layers,
            heads=config.num_attention_heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            intermediate=config.intermediate_size,
            eps=config.rms_norm_eps,
            rope_theta=rope_theta(config),
        )


def rope_theta(config) -> float:
    """transformers 5.x keeps it in `rope_parameters`, 4.3x-4.4x in `rope_theta`; 4.31 has
    neither (10000 fixed). Only for models without a rotary module to ask (see rope.py)."""
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0)


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
