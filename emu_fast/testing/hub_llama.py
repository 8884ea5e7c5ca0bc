"""The LLaMA of the hub's Emu2 remote code, restated for the tests (emu_fast.testing.TinyEmu2Hub).

The hub class does not use transformers' LlamaForCausalLM: its `modeling_llama.py` is its own
copy of the transformers 4.31 file, whatever transformers is installed. What emu_fast meets
there, and what this restates (written for this project from the facts, not copied):
- an `EmuConfig` (not a LlamaConfig) carrying the LLaMA sizes plus `d_model` and
  `vision_config`; no `num_key_value_heads` and no `rope_theta` (no GQA, theta 10000);
- a rotary module per layer (`self_attn.rotary_emb`) with `inv_freq` and cached `cos_cached` /
  `sin_cached` [1, 1, positions, head_dim] buffers, called as `rotary_emb(x, seq_len=...)`;
- raw positions 0..T-1 (pads included) when no position ids are given, an additive
  float-min mask, softmax in float32, and `hidden_states[-1]` taken after the final RMSNorm.
Module and parameter names are Hugging Face LLaMA's, as in the hub checkpoint
(`model.decoder.lm.model.layers.N.self_attn.q_proj.weight`, ...); the decoder layer's class is
`LlamaDecoderLayer`, as Emu2's README names it to accelerate's `no_split_module_classes`.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn
from transformers import PretrainedConfig


class EmuConfig(PretrainedConfig):
    model_type = "emu"

    def __init__(self, vocab_size=32004, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, hidden_act="silu", max_position_embeddings=2048, rms_norm_eps=1e-6,
                 d_model=40, vision_config=None, pad_token_id=32000, **kwargs):
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.hidden_act, self.max_position_embeddings, self.rms_norm_eps = hidden_act, max_position_embeddings, rms_norm_eps
        self.d_model, self.vision_config = d_model, dict(vision_config or {"n_query": 64, "v_query": 64})
        super().__init__(pad_token_id=pad_token_id, **kwargs)


class LlamaRMSNorm(nn.Module):
    def __init__(self, hidden, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.variance_epsilon = eps

    def forward(self, x):
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * xf.to(dtype)


class LlamaRotaryEmbedding(nn.Module):
    """4.31: tables cached at init for max_position_embeddings, rebuilt when asked for more."""

    def __init__(self, dim, max_position_embeddings=2048, base=10000):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._set_cos_sin_cache(max_position_embeddings)

    def _set_cos_sin_cache(self, seq_len):
        self.max_seq_len_cached = seq_len
        t = torch.arange(seq_len, device=self.inv_freq.device, dtype=self.inv_freq.dtype)
        emb = torch.cat([torch.outer(t, self.inv_freq)] * 2, dim=-1)
        self.register_buffer("cos_cached", emb.cos()[None, None], persistent=False)
        self.register_buffer("sin_cached", emb.sin()[None, None], persistent=False)

    def forward(self, x, seq_len=None):
        if seq_len > self.max_seq_len_cached:
            self._set_cos_sin_cache(seq_len)
        return (self.cos_cached[:, :, :seq_len].to(x.dtype), self.sin_cached[:, :, :seq_len].to(x.dtype))


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class LlamaAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.num_heads
        h = config.hidden_size
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(h, h, bias=False) for _ in range(4))
        self.rotary_emb = LlamaRotaryEmbedding(self.head_dim, config.max_position_embeddings)

    def forward(self, x, mask, position_ids):
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        cos, sin = self.rotary_emb(v, seq_len=T)
        cos, sin = cos[0, 0][position_ids].unsqueeze(1), sin[0, 0][position_ids].unsqueeze(1)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        scores = q @ k.transpose(2, 3) / self.head_dim ** 0.5 + mask
        probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return self.o_proj((probs @ v).transpose(1, 2).reshape(B, T, -1))


class LlamaMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj, self.up_proj = nn.Linear(h, i, bias=False), nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.self_attn, self.mlp = LlamaAttention(config), LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, h, mask, position_ids):
        h = h + self.self_attn(self.input_layernorm(h), mask, position_ids)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, output_hidden_states=False,
                return_dict=True, **unused):
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T, _ = h.shape
        position_ids = torch.arange(T, device=h.device)[None].expand(B, T)  # raw positions, pads included
        low = torch.finfo(h.dtype).min
        allowed = torch.ones(T, T, dtype=torch.bool, device=h.device).tril()[None, None]
        if attention_mask is not None:
            allowed = allowed & attention_mask.bool()[:, None, None, :]
        mask = torch.zeros(allowed.shape, dtype=h.dtype, device=h.device).masked_fill(~allowed, low)
        states = []
        for layer in self.layers:
            states.append(h)
            h = layer(h, mask, position_ids)
        h = self.norm(h)
        states.append(h)  # the last hidden state is the final-normed one
        return SimpleNamespace(last_hidden_state=h, hidden_states=tuple(states) if output_hidden_states else None)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
