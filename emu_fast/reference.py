"""The pure-PyTorch oracle every emu_fast test compares to.

It has two parts, both short enough to read in one sitting:

* the LLaMA body as Hugging Face runs it (RMSNorm, rotate-half RoPE, multi-head attention with
  optional grouped KV heads, SwiGLU MLP), over a plain dict of weights with Hugging Face names;
* Emu's upstream `generate_image` loop, which re-tokenizes and re-runs the whole sequence at
  every one of the n steps, with no KV cache (docs/architecture.md, "Why the results agree");

plus one function per emu_fast op, computed the obvious way in float32.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .config import LlamaShape  # noqa: F401  (re-exported: the oracle's users build shapes with it)


# ---------------------------------------------------------------------------- building blocks


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face LlamaRMSNorm: normalize in float32, round to x's dtype, then scale."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rope_tables(head_dim: int, positions: int, theta: float):
    """cos, sin: float32 [positions, head_dim/2]."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.outer(torch.arange(positions, dtype=torch.float32), inv_freq)
    return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE. x [..., D]; cos, sin broadcast to [..., D/2]."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def attention(q, k, v, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """q [B,Hq,Tq,D], k/v [B,Hkv,Tk,D], mask bool broadcastable to [B,Hq,Tq,Tk] (True = attend).
    float32 softmax; grouped KV heads are repeated."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v.float()).to(q.dtype)


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x @ w.t()


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


# ---------------------------------------------------------------------------- the LLaMA body


def llama_body(w: dict, shape: LlamaShape, embeds: torch.Tensor, attention_mask: torch.Tensor,
               rope: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """Hugging Face LlamaModel on inputs_embeds [B,T,H] with a padding mask [B,T] and no
    position ids (positions are 0..T-1, pads included). Returns the final-normed hidden states.
    `w` uses Hugging Face names without the `model.` prefix (`layers.0.self_attn.q_proj.weight`).
    `rope`: (cos, sin) [>= T, D/2] float32 tables to use instead of ones from rope_theta (a model
    whose rotary buffers were rounded runs with those)."""
    B, T, _ = embeds.shape
    D, Hq, Hkv = shape.head_dim, shape.heads, shape.kv_heads
    cos, sin = rope_tables(D, T, shape.rope_theta) if rope is None else (rope[0][:T].float(), rope[1][:T].float())
    cos, sin = cos[None, None], sin[None, None]  # [1, 1, T, D/2]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    mask = causal[None, None] & attention_mask.bool()[:, None, None, :]
    # Rows with no key to attend to (left padding) would be all -inf; let them see themselves.
    # Their outputs are never used, and this keeps NaN out of the valid rows.
    mask = mask | torch.eye(T, dtype=torch.bool)[None, None]
    h = embeds
    for i in range(shape.layers):
        p = f"layers.{i}."
        x = rms_norm(h, w[p + "input_layernorm.weight"], shape.eps)
        q = linear(x, w[p + "self_attn.q_proj.weight"]).view(B, T, Hq, D).transpose(1, 2)
        k = linear(x, w[p + "self_attn.k_proj.weight"]).view(B, T, Hkv, D).transpose(1, 2)
        v = linear(x, w[p + "self_attn.v_proj.weight"]).view(B, T, Hkv, D).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = attention(q, k, v, mask).transpose(1, 2).reshape(B, T, Hq * D)
        h = h + linear(o, w[p + "self_attn.o_proj.weight"])
        x = rms_norm(h, w[p + "post_attention_layernorm.weight"], shape.eps)
        gate_up = torch.cat([linear(x, w[p + "mlp.gate_proj.weight"]), linear(x, w[p + "mlp.up_proj.weight"])], -1)
        h = h + linear(silu_mul(gate_up), w[p + "mlp.down_proj.weight"])
    return rms_norm(h, w["norm.weight"], shape.eps)


def body_weights(lm) -> dict:
    """The LLaMA body's weights of a Hugging Face LlamaForCausalLM (or LlamaModel), by name."""
    model = getattr(lm, "model", lm)
    return {name: p.detach() for name, p in model.named_parameters()}


# ---------------------------------------------------------------------------- upstream generate_image


def upstream_generate_image(
    *,
    body: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    embed_tokens: Callable[[torch.Tensor], torch.Tensor],
    tokenizer,
    texts: Sequence[str],
    n: int,
    image_placeholder: str,
    regress: Callable[[torch.Tensor], torch.Tensor],
    project_up: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    prompt_image_embeds: Optional[torch.Tensor] = None,
    placeholder: str = "[<IMG_PLH>]",
    device=None,
) -> torch.Tensor:
    """Emu's generate_image loop exactly as upstream runs it (docs/architecture.md, "Why the
    results agree"): n full forward
    passes over re-tokenized, growing prompts. `body(embeds, mask)` returns final-normed hidden
    states; `regress` is the regression head (Emu1 stu_regress_head, Emu2 project_down);
    `project_up` maps outputs back to inputs (Emu2) or is None (Emu1). `prompt_image_embeds`
    [N, H] fill the prompt's <image> slots in row-major order. Returns [B, n, D]."""
    image_id, boi_id = tokenizer.convert_tokens_to_ids(["<image>", "[IMG]"])
    texts = [t.replace(placeholder, image_placeholder) for t in texts]
    outputs = None
    for k in range(n):
        texts = [t + ("[IMG]" if k == 0 else "<image>") for t in texts]
        tok = tokenizer(texts, padding="longest", return_tensors="pt")
        ids, mask = tok.input_ids.to(device), tok.attention_mask.to(device)
        embeds = embed_tokens(ids)
        is_image = ids == image_id
        after = is_image.flip(1).cumsum(1).flip(1)  # <image> tokens at or after each position
        if prompt_image_embeds is not None:
            embeds[is_image & (after > k)] = prompt_image_embeds.to(embeds.dtype)
        if outputs is not None:
            fed = outputs if project_up is None else project_up(outputs)
            embeds[is_image & (after > 0) & (after <= k)] = fed.to(embeds.dtype)
        hidden = body(embeds, mask)
        is_slot = is_image | (ids == boi_id)
        after = is_slot.flip(1).cumsum(1).flip(1)
        outputs = regress(hidden[is_slot & (after > 0) & (after <= k + 1)])
    B = len(texts)
    return outputs.view(B, n, -1)


# ---------------------------------------------------------------------------- the emu_fast ops


def splice_embeddings(input_ids, embed_table, slot_values, slot_token_id: int) -> torch.Tensor:
    out = embed_table[input_ids].clone()
    if slot_token_id >= 0:
        out[input_ids == slot_token_id] = slot_values
    return out


def decode_attention(q, k, v, k_cache, v_cache, cache_lens, positions, rope_cos, rope_sin, scale,
                     split_counters=None):
    """Mutates the caches like the op; returns [B,Hq,D]. split_counters: only how the CUDA kernel
    merges its splits; the result does not depend on it."""
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    out = torch.empty_like(q)
    for b in range(B):
        n, p = int(cache_lens[b]), int(positions[b])
        cos, sin = rope_cos[p].to(q.device), rope_sin[p].to(q.device)
        k_cache[b, :, n] = apply_rope(k[b].float(), cos, sin).to(k_cache.dtype)
        v_cache[b, :, n] = v[b]
        qr = apply_rope(q[b].float(), cos, sin)  # [Hq, D]
        keys = k_cache[b, :, : n + 1].float().repeat_interleave(Hq // Hkv, 0)  # [Hq, n+1, D]
        vals = v_cache[b, :, : n + 1].float().repeat_interleave(Hq // Hkv, 0)
        scores = (keys @ qr.unsqueeze(-1)).squeeze(-1) * scale
        out[b] = (scores.softmax(-1).unsqueeze(1) @ vals).squeeze(1).to(q.dtype)
    return out


def gemv(x, weight):
    return (x.float() @ weight.float().t()).to(x.dtype)


def norm_gemv(x, norm_weight, eps, weight):
    return gemv(rms_norm(x, norm_weight, eps), weight)


def gemv_add(x, weight, residual):
    """The product rounded to the dtype, then the sum (ATen's residual + linear(x, weight))."""
    return (residual.float() + gemv(x, weight).float()).to(x.dtype)


def norm_gemv_silu(x, norm_weight, eps, gate_up_weight):
    """Each product rounded to the dtype, then SiLU * mul (as silu_mul(norm_gemv(...)))."""
    return silu_mul(norm_gemv(x, norm_weight, eps, gate_up_weight))


def add_rms_norm(x, residual, weight, eps):
    s = x + residual
    return rms_norm(s, weight, eps), s


def regression_head(hidden, norm_weight, eps, head_weight, up_weight=None):
    out = gemv(rms_norm(hidden, norm_weight, eps), head_weight)
    nxt = gemv(out, up_weight) if up_weight is not None else hidden.new_empty(hidden.shape[0], 0)
    return out, nxt


def gemv_int8(x, qweight, scales):
    """x @ dequantize_int8(qweight, scales)^T in float32, rounded to x's dtype."""
    from .quant.schemes import dequantize_int8
    return gemv(x, dequantize_int8(qweight, scales))


def gemv_int4(x, qweight, scales, group_size):
    """x @ dequantize_int4(qweight, scales, K, group_size)^T in float32, rounded to x's dtype."""
    from .quant.schemes import dequantize_int4
    return gemv(x, dequantize_int4(qweight, scales, x.shape[1], group_size))
