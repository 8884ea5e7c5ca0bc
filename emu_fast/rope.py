"""The RoPE tables a model actually runs with, taken from its own rotary module.

Why not recompute them from `rope_theta`: upstream Emu1's `LLaMAForClsAndRegression.__init__`
calls `self.lm.bfloat16()`, which rounds the rotary module's buffers (`inv_freq`, and in
transformers 4.31 the `cos_cached`/`sin_cached` tables) to bfloat16 for good: they are not in
the checkpoint (or, in 4.31, `inv_freq` is but the cached tables are not), and a later
`.float()` does not restore them. The model then always runs with the rounded frequencies;
tables rebuilt from theta differ from them by up to 3.7e-3, enough to move the outputs by
~1e-3 relative. Asking the module itself gives whatever the installed transformers computes.
"""
from __future__ import annotations

import copy
import inspect
from typing import Callable, List, Tuple

import torch

from .dropin.walk import llama_body_of


def rotary_modules(lm) -> List[torch.nn.Module]:
    """The rotary-embedding modules of a Hugging Face LLaMA: one shared by all layers
    (transformers >= 4.38: `model.rotary_emb`) or one per layer (older: `self_attn.rotary_emb`)."""
    body = llama_body_of(lm)
    shared = getattr(body, "rotary_emb", None)
    if shared is not None:
        return [shared]
    return [m for m in (getattr(layer.self_attn, "rotary_emb", None) for layer in body.layers) if m is not None]


def theta_rope_tables(head_dim: int, positions: int, theta: float, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos, sin float32 [positions, head_dim / 2] from theta, as Hugging Face LLaMA computes them
    from fresh float32 frequencies (for decoders built by hand, without a model)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    freqs = torch.arange(positions, dtype=torch.float32, device=device)[:, None] * inv_freq
    return freqs.cos(), freqs.sin()


def _call_rotary(module: torch.nn.Module, positions: int, head_dim: int, dtype, device):
    """cos, sin [positions, head_dim] as the module returns them for a sequence 0..positions-1."""
    # A copy, so the call cannot change the model: 4.31-style modules rebuild (and keep) their
    # cached tables when asked for more positions than they hold.
    module = copy.deepcopy(module)
    x = torch.zeros(1, 1, positions, head_dim, dtype=dtype, device=device)
    params = inspect.signature(module.forward).parameters
    with torch.no_grad():
        if "position_ids" in params:  # transformers >= 4.38
            cos, sin = module(x, position_ids=torch.arange(positions, device=device)[None])
        else:  # transformers <= 4.37: forward(x, seq_len)
            cos, sin = module(x, seq_len=positions)
    if cos.numel() != positions * head_dim or sin.numel() != positions * head_dim:
        raise TypeError(f"emu_fast: the model's rotary embedding {type(module).__name__} returned cos/sin of shape "
                        f"{tuple(cos.shape)} for {positions} positions of head dim {head_dim}; not a LLaMA RoPE")
    return cos.reshape(positions, head_dim), sin.reshape(positions, head_dim)


# How far two layers' cached cos/sin tables may differ and still be one RoPE: transformers 4.31
# builds each layer's table at init from the same inv_freq, but the angle t * inv_freq is not
# always rounded the same way from one layer's build to the next (in some processes, not all),
# one float32 ulp of an angle near 2048, so up to 2.4e-4 in cos. The frequencies
# themselves (inv_freq) must be equal.
TABLE_TOLERANCE = 1e-3


def _same_buffers(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Whether two rotary modules are the same RoPE: equal buffers, except the cached tables,
    which may differ by the rounding above (as far as can be seen: a module on the meta device
    has no values; a model split over devices is refused later, by its weights)."""
    ab, bb = dict(a.named_buffers()), dict(b.named_buffers())

    def same(name, x, y):
        if x.shape != y.shape:
            return False
        if x.is_meta or y.is_meta:
            return True
        x, y = x.cpu(), y.cpu()
        if "cached" in name:  # cos_cached / sin_cached: derived from the (equal) inv_freq
            return bool(((x.float() - y.float()).abs() <= TABLE_TOLERANCE).all())
        return torch.equal(x, y)

    return ab.keys() == bb.keys() and all(same(k, ab[k], bb[k]) for k in ab)


def model_rope_tables(lm, positions: int, head_dim: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos, sin float32 [positions, head_dim / 2] for positions 0..positions-1, exactly as the
    model's own rotary module gives them for its dtype (the tables rounded to that dtype, as the
    model's attention uses them), on the model's device. A model without a rotary module gets
    tables from its config's rope_theta."""
    return model_rope_fn(lm, head_dim)(positions)


def model_rope_fn(lm, head_dim: int) -> Callable[[int], Tuple[torch.Tensor, torch.Tensor]]:
    """positions -> (cos, sin) as model_rope_tables gives them, for a decoder to extend its
    tables as requests grow; the rotary module is checked now. It keeps a copy of the rotary
    module (a few small buffers), not the model: a decoder holding it keeps no model alive."""
    from .config import rope_theta

    weight = llama_body_of(lm).embed_tokens.weight
    dtype, device = weight.dtype, weight.device
    modules = rotary_modules(lm)
    if not modules:
        theta = rope_theta(lm.config)
        return lambda positions: theta_rope_tables(head_dim, positions, theta, device)
    for i, other in enumerate(modules[1:], start=1):
        if not _same_buffers(modules[0], other):
            raise TypeError(f"emu_fast: layer {i}'s rotary embedding differs from layer 0's; emu_fast runs every "
                            "layer with one RoPE table")
    module = copy.deepcopy(modules[0])

    def tables(positions: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return _half_tables(*_call_rotary(module, positions, head_dim, dtype, device), head_dim)

    tables(1)  # refuses an unusable rotary module now, not at the first request
    return tables


def _half_tables(cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> Tuple[torch.Tensor, torch.Tensor]:
    cos, sin = cos.float(), sin.float()
    half = head_dim // 2
    # LLaMA's rotate-half RoPE repeats each frequency in both halves; our kernels keep one half.
    if not cos.is_meta and not (torch.equal(cos[:, :half], cos[:, half:]) and torch.equal(sin[:, :half], sin[:, half:])):
        raise TypeError("emu_fast: the model's RoPE tables are not LLaMA's rotate-half layout (halves differ)")
    return cos[:, :half].contiguous(), sin[:, :half].contiguous()
