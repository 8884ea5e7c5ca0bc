"""Python face of the emu_fast custom ops (torch.ops.emu_fast.*): fake implementations, so
the ops trace under torch.compile / FakeTensor, and typed wrappers. The schemas live in
csrc/ops_registration.cpp, the kernels in csrc/cpu and csrc/cuda."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import _C  # noqa: F401  (loading the extension registers the ops)

_ops = torch.ops.emu_fast


@torch.library.register_fake("emu_fast::splice_embeddings")
def _(input_ids, embed_table, slot_values, slot_token_id):
    return embed_table.new_empty(input_ids.shape[0], input_ids.shape[1], embed_table.shape[1])


@torch.library.register_fake("emu_fast::decode_attention")
def _(q, k, v, k_cache, v_cache, cache_lens, positions, rope_cos, rope_sin, scale):
    return q.new_empty(q.shape)


@torch.library.register_fake("emu_fast::regression_head")
def _(hidden, norm_weight, eps, head_weight, up_weight):
    out = hidden.new_empty(hidden.shape[0], head_weight.shape[0])
    nxt = hidden.new_empty(hidden.shape[0], up_weight.shape[0] if up_weight is not None else 0)
    return out, nxt


@torch.library.register_fake("emu_fast::gemv")
def _(x, weight):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.register_fake("emu_fast::rms_norm")
def _(x, weight, eps):
    return x.new_empty(x.shape)


@torch.library.register_fake("emu_fast::add_rms_norm")
def _(x, residual, weight, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape)


@torch.library.register_fake("emu_fast::silu_mul")
def _(gate_up):
    return gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)


def splice_embeddings(input_ids: torch.Tensor, embed_table: torch.Tensor, slot_values: torch.Tensor,
                      slot_token_id: int) -> torch.Tensor:
    """Embed input_ids [B,T] and write slot_values [S,H] into the slots (id == slot_token_id) in
    row-major order, in one pass. S must equal the number of slots."""
    return _ops.splice_embeddings(input_ids, embed_table, slot_values, slot_token_id)


def decode_attention(q, k, v, k_cache, v_cache, cache_lens, positions, rope_cos, rope_sin,
                     scale: Optional[float] = None) -> torch.Tensor:
    """One decode step: RoPE, append k/v to the caches at cache_lens, attend over [0, cache_lens]."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return _ops.decode_attention(q, k, v, k_cache, v_cache, cache_lens, positions, rope_cos, rope_sin, scale)


def regression_head(hidden, norm_weight, eps: float, head_weight,
                    up_weight: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(hidden) @ head^T, that @ up^T or an empty [B,0])."""
    return _ops.regression_head(hidden, norm_weight, eps, head_weight, up_weight)


def gemv(x, weight) -> torch.Tensor:
    return _ops.gemv(x, weight)


def rms_norm(x, weight, eps: float) -> torch.Tensor:
    return _ops.rms_norm(x, weight, eps)


def add_rms_norm(x, residual, weight, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    return _ops.add_rms_norm(x, residual, weight, eps)


def silu_mul(gate_up) -> torch.Tensor:
    return _ops.silu_mul(gate_up)
