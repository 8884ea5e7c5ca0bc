"""The loops a user would write instead of installing emu_fast, to measure it against.

* `hf_kv_cache_generate_image`: the Hugging Face way. Tokenize once, prefill with `use_cache`,
  then n-1 single-token steps through the model's own DynamicCache, eager.
* `StaticCacheLoop`: the strongest plain-PyTorch loop, gpt-fast style. A preallocated KV cache
  [B, Hkv, S, D] per layer, the LLaMA body written out over the model's own weights, a decode
  step that writes one slot with `index_copy_` and attends under a mask of the valid slots, the
  step optionally compiled with `torch.compile` (fixed shapes, so one compilation per batch
  and cache size).

Both compute what the model's own `generate_image` computes (docs/architecture.md, "Why the results agree": one prefill of the
prompt plus `[IMG]`, then each output fed back as the next input), checked by
tests/test_benchmark.py to 1e-4 in float32. Nothing here branches on Emu1/Emu2: what differs
(regression head, project_up, prompt images, prompt text) comes from
`emu_fast.dropin.families.family_of(model)`.

Padding and positions: upstream runs the prompt with no position ids, so every row's tokens sit
at 0..T-1, pads included (right padding for Emu1, left for Emu2). Each row's next token
continues from that row's own last real token (position last+1, last+2, ...), which is what
the upstream loop's re-tokenized, growing sequence gives that row.

Import from the repository root as `from benchmarks.peers import hf_kv_cache_generate_image`
(benchmarks/ is a package; put the root on sys.path when running from elsewhere).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from emu_fast.dropin.families import DEFAULT_PLACEHOLDER, family_of
from emu_fast.reference import rms_norm
from emu_fast.rope import model_rope_tables


def tokenized_prompt(model, text: Sequence[str], image: Optional[torch.Tensor] = None,
                     placeholder: str = DEFAULT_PLACEHOLDER):
    """What generate_image runs its first pass on: (embeds [B,T,H], mask [B,T]) with prompt
    images spliced into the `<image>` slots, row-major, as upstream does."""
    family = family_of(model)
    lm, tok = model.decoder.lm, model.decoder.tokenizer
    enc = tok(family.prompt_texts(model, text, placeholder), padding="longest", return_tensors="pt")
    device = lm.model.embed_tokens.weight.device
    ids, mask = enc.input_ids.to(device), enc.attention_mask.to(device)
    embeds = lm.model.embed_tokens(ids)
    if image is not None:
        vectors = family.prompt_image_embeds(model, image)
        embeds[ids == tok.convert_tokens_to_ids("<image>")] = vectors.to(embeds.dtype)
    return embeds, mask


def last_real_index(mask: torch.Tensor) -> torch.Tensor:
    """[B] index of each row's last real (unpadded) token, for left or right padding."""
    T = mask.shape[1]
    return T - 1 - mask.flip(1).argmax(1)


# ---------------------------------------------------------------------------- Hugging Face


@torch.no_grad()
def hf_kv_cache_generate_image(model, text, image=None, placeholder=DEFAULT_PLACEHOLDER):
    """The baseline a Hugging Face user would write: tokenize once, prefill with use_cache, then
    n-1 single-token steps through the model's own DynamicCache, in eager PyTorch. Positions are
    passed explicitly so right-padded rows continue from their own last token, as upstream does.
    Returns [B, n, D] like generate_image."""
    family = family_of(model)
    lm = model.decoder.lm
    head, up = family.head(model), family.project_up(model)
    embeds, mask = tokenized_prompt(model, text, image, placeholder)
    B = embeds.shape[0]
    last = last_real_index(mask)
    rows = torch.arange(B, device=embeds.device)
    out = lm.model(inputs_embeds=embeds, attention_mask=mask, use_cache=True)
    # transformers >= 5.2x returns the cache as `cache`, older releases as `past_key_values`;
    # the forward takes the same name it returns.
    cache_arg = "cache" if "cache" in out else "past_key_values"
    cache = out[cache_arg]
    y = head(out.last_hidden_state[rows, last])
    outs = [y]
    for k in range(1, family.n(model)):
        x = y if up is None else up(y)
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        out = lm.model(inputs_embeds=x[:, None], attention_mask=mask, position_ids=(last + k)[:, None],
                       use_cache=True, **{cache_arg: cache})
        cache = out[cache_arg]
        y = head(out.last_hidden_state[:, -1])
        outs.append(y)
    return torch.stack(outs, dim=1)


# ---------------------------------------------------------------------------- static cache


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope(x, cos, sin):
    """Hugging Face LLaMA's RoPE, in x's dtype with the model's own tables (full head dim)."""
    return x * cos + _rotate_half(x) * sin


class StaticCacheLoop(nn.Module):
    """gpt-fast-style generate_image for one batch size and cache length.

    The model's modules are held, not copied (so their weights are parameters here too, which
    CUDA graphs need to treat them as static); the caches, RoPE tables and the valid-slot mask
    are buffers mutated in place, so the step has fixed shapes and no allocations to trace.

    Slot layout: the prompt occupies slots 0..T-1 exactly as tokenized (pads included, masked
    off); decode step k (1..n-1) writes slot T+k-1 for every row. Only the RoPE position is
    per row (last real token + k), so left and right padding need no special case.

        loop = StaticCacheLoop(model, batch=2, max_seq_len=256, compile_mode="default")
        out = loop.generate_image(["a cat", "a dog"])    # [B, n, D], as model.generate_image
    """

    def __init__(self, model, batch: int, max_seq_len: int, compile_mode: Optional[str] = None,
                 compile_backend: str = "inductor"):
        super().__init__()
        family = family_of(model)
        lm = model.decoder.lm
        cfg = lm.config
        self.model_ref = [model]  # a list, so the model is not registered as a submodule
        self.n = family.n(model)
        self.layers = lm.model.layers
        self.norm = lm.model.norm
        self.head = family.head(model)
        self.up = family.project_up(model)
        self.eps = cfg.rms_norm_eps
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.batch, self.max_seq_len = batch, max_seq_len
        weight = lm.model.embed_tokens.weight
        dtype, device = weight.dtype, weight.device
        shape = (batch, self.kv_heads, max_seq_len, self.head_dim)
        for i in range(len(self.layers)):
            self.register_buffer(f"k{i}", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
            self.register_buffer(f"v{i}", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        # The model's own RoPE tables (its rotary module, whichever transformers built it; rounded
        # to its dtype, as its attention uses them), both halves as rotate-half wants them.
        cos, sin = model_rope_tables(lm, max_seq_len, self.head_dim)
        self.register_buffer("cos", torch.cat([cos, cos], -1).to(dtype), persistent=False)  # [S, D]
        self.register_buffer("sin", torch.cat([sin, sin], -1).to(dtype), persistent=False)
        self.register_buffer("valid", torch.zeros(batch, max_seq_len, dtype=torch.bool, device=device),
                             persistent=False)
        # position of slot s for row b during decode: first_pos[b] + s (set by prefill)
        self.register_buffer("first_pos", torch.zeros(batch, dtype=torch.long, device=device), persistent=False)
        # One index tensor per slot, made once: the step takes the slot as a tensor so that every
        # step runs the same compiled graph (a Python int would be a constant, recompiled per step).
        self.slots = [torch.tensor([s], device=device) for s in range(max_seq_len)]
        self.prompt_len = 0
        self.compile_mode = compile_mode
        self._step = self._decode_step
        if compile_mode is not None:
            # Fixed shapes (dynamic=False): one graph per batch size and cache length, no guards
            # on sizes. fullgraph=True: a graph break would quietly leave part of the step eager.
            # (compile_backend="eager" traces without generating code: the tests' quick check
            # that the step compiles as one graph and computes the same.)
            kw = {"mode": compile_mode} if compile_backend == "inductor" else {}
            self._step = torch.compile(self._decode_step, backend=compile_backend, dynamic=False, fullgraph=True, **kw)

    # The LLaMA body over the model's weights: T new tokens at cache slots `slots`, attending to
    # the first `keys` cache slots under `mask` [B, 1, T, keys] (True = attend).
    def _body(self, h, cos, sin, slots, mask, keys):
        B, T, _ = h.shape
        Hq, Hkv, D = self.heads, self.kv_heads, self.head_dim
        for i, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            x = rms_norm(h, layer.input_layernorm.weight, self.eps)
            q = F.linear(x, attn.q_proj.weight, attn.q_proj.bias).view(B, T, Hq, D).transpose(1, 2)
            k = F.linear(x, attn.k_proj.weight, attn.k_proj.bias).view(B, T, Hkv, D).transpose(1, 2)
            v = F.linear(x, attn.v_proj.weight, attn.v_proj.bias).view(B, T, Hkv, D).transpose(1, 2)
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
            k_cache, v_cache = getattr(self, f"k{i}"), getattr(self, f"v{i}")
            k_cache.index_copy_(2, slots, k)
            v_cache.index_copy_(2, slots, v)
            o = F.scaled_dot_product_attention(q, k_cache[:, :, :keys], v_cache[:, :, :keys], attn_mask=mask,
                                               enable_gqa=Hq != Hkv)
            h = h + F.linear(o.transpose(1, 2).reshape(B, T, Hq * D), attn.o_proj.weight, attn.o_proj.bias)
            x = rms_norm(h, layer.post_attention_layernorm.weight, self.eps)
            gate = F.linear(x, mlp.gate_proj.weight, mlp.gate_proj.bias)
            up = F.linear(x, mlp.up_proj.weight, mlp.up_proj.bias)
            h = h + F.linear(F.silu(gate) * up, mlp.down_proj.weight, mlp.down_proj.bias)
        return rms_norm(h, self.norm.weight, self.eps)

    def _regress(self, hidden):
        """hidden [B, H] -> (output [B, D], next input [B, H])."""
        y = self.head(hidden)
        return y, (y if self.up is None else self.up(y))

    @torch.no_grad()
    def prefill(self, embeds: torch.Tensor, mask: torch.Tensor):
        """Prompt embeds [B, T, H] and padding mask [B, T] -> (output 0, next input). Eager: it
        runs once per image, the n-1 steps are what compiling is for."""
        B, T, _ = embeds.shape
        if B != self.batch or T + self.n - 1 > self.max_seq_len:
            raise ValueError(f"StaticCacheLoop built for batch {self.batch}, {self.max_seq_len} slots; got batch {B}, "
                             f"prompt {T} + {self.n - 1} steps")
        self.prompt_len = T
        self.valid.zero_()
        self.valid[:, :T] = mask.bool()
        last = last_real_index(mask)
        self.first_pos.copy_(last + 1 - T)  # slot T (step 1) is at position last+1
        slots = torch.arange(T, device=embeds.device)
        # Causal over the prompt and padding-masked; a query may always see itself, so a pad row
        # with no real key before it (left padding) gets no all-masked softmax (NaN), which
        # would then reach real rows through its cached K/V (0 * NaN).
        causal = torch.ones(T, T, dtype=torch.bool, device=embeds.device).tril()
        attend = causal[None, None] & self.valid[:, None, None, :T]
        attend = attend | torch.eye(T, dtype=torch.bool, device=embeds.device)[None, None]
        hidden = self._body(embeds, self.cos[None, None, :T], self.sin[None, None, :T], slots, attend, T)
        return self._regress(hidden[torch.arange(B, device=embeds.device), last])

    def _decode_step(self, x, slot):
        """x [B, H]: the previous output fed back; slot [1]: the cache slot to write."""
        self.valid.index_fill_(1, slot, True)
        pos = self.first_pos + slot  # [B]: each row continues from its own last token
        cos, sin = self.cos[pos][:, None, None], self.sin[pos][:, None, None]  # [B, 1, 1, D]
        hidden = self._body(x[:, None], cos, sin, slot, self.valid[:, None, None, :], self.max_seq_len)
        return self._regress(hidden[:, 0])

    @torch.no_grad()
    def step(self, x: torch.Tensor, k: int):
        """Decode step k (1..n-1) on the previous step's next input x -> (output k, next input)."""
        return self._step(x, self.slots[self.prompt_len + k - 1])

    @torch.no_grad()
    def generate(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        y, x = self.prefill(embeds, mask)
        outs: List[torch.Tensor] = [y]
        for k in range(1, self.n):
            y, x = self.step(x, k)
            # Copies: under CUDA graphs (reduce-overhead) the next replay overwrites the step's
            # output buffers, the one being fed back included.
            y, x = y.clone(), x.clone()
            outs.append(y)
        return torch.stack(outs, dim=1)

    @torch.no_grad()
    def generate_image(self, text, image=None, placeholder=DEFAULT_PLACEHOLDER) -> torch.Tensor:
        embeds, mask = tokenized_prompt(self.model_ref[0], text, image, placeholder)
        return self.generate(embeds, mask)


def static_cache_generate_image(model, text, image=None, placeholder=DEFAULT_PLACEHOLDER,
                                compile_mode: Optional[str] = None, compile_backend: str = "inductor") -> torch.Tensor:
    """One-off StaticCacheLoop sized for this request (tests; the benchmark keeps one loop)."""
    embeds, mask = tokenized_prompt(model, text, image, placeholder)
    loop = StaticCacheLoop(model, embeds.shape[0], embeds.shape[1] + family_of(model).n(model), compile_mode,
                           compile_backend)
    return loop.generate(embeds, mask)
