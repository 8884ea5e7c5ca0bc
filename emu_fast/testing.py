"""Tiny random Emu1- and Emu2-shaped models for the tests and the benchmark (needs transformers).

They have the attributes upstream's models have (SEMANTICS.md; baaivision/Emu Emu1/models/
modeling_emu.py and Emu2/emu/emu.py) and a `generate_image` that runs upstream's recompute
loop (emu_fast.reference.upstream_generate_image) on Hugging Face modules, as upstream does.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from emu_fast import reference

VOCAB = 32004  # LLaMA's 32000 + [PAD], [IMG], [/IMG], <image>


def tiny_llama(hidden=64, layers=2, heads=4, kv_heads=None, intermediate=96, vocab=VOCAB, seed=0,
               dtype=torch.float32, init_std=0.05) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads or heads, rms_norm_eps=1e-6,
                      initializer_range=init_std, pad_token_id=0)
    # Built directly in `dtype`: an Emu1-13B-shaped model in float32 and then cast would need
    # three times its bf16 size on the GPU at once.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        lm = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():  # random norm weights, so a wrong or missing norm shows
        for name, p in lm.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
    return lm


def _hf_body(lm):
    def body(embeds, mask):
        out = lm.model(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True, return_dict=True)
        return out.hidden_states[-1]
    return body


class _Visual(nn.Module):
    """Stands in for EVA-CLIP: [N, 3, 8, 8] images -> [N, 16 patches, width]."""

    def __init__(self, width):
        super().__init__()
        self.patch = nn.Linear(3 * 4, width)

    def forward_features(self, image):
        n = image.shape[0]
        patches = image.unfold(2, 2, 2).unfold(3, 2, 2).reshape(n, 3, 16, 4).permute(0, 2, 1, 3).reshape(n, 16, 12)
        return self.patch(patches)

    def forward(self, image):  # Emu2's visual returns a class token first
        x = self.forward_features(image)
        return torch.cat([x.mean(1, keepdim=True), x], dim=1)


class _CFormer(nn.Module):
    """Stands in for Emu1's causal former: [N, P, width] -> [N, n_causal, hidden]."""

    def __init__(self, width, n, hidden):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(n, width) * 0.5)
        self.proj = nn.Linear(width, hidden)

    def forward(self, feats):
        attn = (self.queries @ feats.transpose(1, 2)).softmax(-1)
        return self.proj(attn @ feats)


class TinyEmu1(nn.Module):
    def __init__(self, tokenizer, lm: LlamaForCausalLM, n_causal=8, vision_width=24):
        super().__init__()
        hidden = lm.config.hidden_size
        dtype = lm.model.embed_tokens.weight.dtype
        self.decoder = nn.Module()
        self.decoder.lm = lm
        self.decoder.tokenizer = tokenizer
        tokenizer.padding_side = "right"
        lm.stu_regress_head = nn.Linear(hidden, hidden, bias=False).to(dtype)
        self.visual = _Visual(vision_width).to(dtype)
        self.ln_visual = nn.LayerNorm(vision_width).to(dtype)
        self.cformer = _CFormer(vision_width, n_causal, hidden).to(dtype)
        self.n_causal = n_causal
        self.image_placeholder = "[IMG]" + "<image>" * n_causal + "[/IMG]"

    @torch.no_grad()
    def generate_image(self, text, image=None, placeholder="[<IMG_PLH>]"):
        prompt = None
        if image is not None:
            prompt = self.cformer(self.ln_visual(self.visual.forward_features(image)))
            prompt = prompt.view(-1, prompt.shape[-1])
        lm = self.decoder.lm
        return reference.upstream_generate_image(
            body=_hf_body(lm), embed_tokens=lm.model.embed_tokens, tokenizer=self.decoder.tokenizer,
            texts=text, n=self.n_causal, image_placeholder=self.image_placeholder,
            regress=lm.stu_regress_head, prompt_image_embeds=prompt, placeholder=placeholder,
            device=self.ln_visual.weight.device)


class TinyEmu2(nn.Module):
    def __init__(self, tokenizer, lm: LlamaForCausalLM, n_query=16, vision_width=40):
        super().__init__()
        hidden = lm.config.hidden_size
        dtype = lm.model.embed_tokens.weight.dtype
        self.visual = _Visual(vision_width).to(dtype)
        self.decoder = nn.Module()
        self.decoder.lm = lm
        self.decoder.tokenizer = tokenizer
        tokenizer.padding_side = tokenizer.truncation_side = "left"
        lm.project_up = nn.Linear(vision_width, hidden, bias=False).to(dtype)
        lm.project_down = nn.Linear(hidden, vision_width, bias=False).to(dtype)
        self.n_query = n_query
        self.image_placeholder = "[IMG]" + "<image>" * n_query + "[/IMG]"

    @torch.no_grad()
    def encode_image(self, image):
        x = self.visual(image)[:, 1:, :]  # [N, 16, C]
        b, n, c = x.shape
        side = int(n ** 0.5)
        x = x.permute(0, 2, 1).reshape(b, c, side, side)
        stride = int(side // (self.n_query ** 0.5))
        x = nn.functional.avg_pool2d(x, kernel_size=stride, stride=stride)
        return x.reshape(b, c, -1).permute(0, 2, 1).contiguous()

    @torch.no_grad()
    def generate_image(self, text, image=None, placeholder="[<IMG_PLH>]"):
        lm = self.decoder.lm
        prompt = None
        if image is not None:
            x = self.encode_image(image)
            prompt = lm.project_up(x.view(-1, x.shape[-1]))
        return reference.upstream_generate_image(
            body=_hf_body(lm), embed_tokens=lm.model.embed_tokens, tokenizer=self.decoder.tokenizer,
            texts=text, n=self.n_query, image_placeholder=self.image_placeholder,
            regress=lm.project_down, project_up=lm.project_up, prompt_image_embeds=prompt,
            placeholder=placeholder, device=lm.model.embed_tokens.weight.device)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest relative error of a against b over output vectors (last dim)."""
    a, b = a.float(), b.float()
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-30)).max())


def _kind(model) -> str:
    return "emu1" if hasattr(model, "n_causal") else "emu2"


@torch.no_grad()
def hf_kv_cache_generate_image(model, text, image=None, placeholder="[<IMG_PLH>]"):
    """The baseline a Hugging Face user would write: tokenize once, prefill with use_cache, then
    n-1 single-token steps through the model's own DynamicCache, in eager PyTorch. Positions are
    passed explicitly so right-padded rows continue from their own last token, as upstream does."""
    lm, tok = model.decoder.lm, model.decoder.tokenizer
    emu1 = _kind(model) == "emu1"
    n = model.n_causal if emu1 else model.n_query
    head = lm.stu_regress_head if emu1 else lm.project_down
    texts = [t.replace(placeholder, model.image_placeholder) + "[IMG]" for t in text]
    enc = tok(texts, padding="longest", return_tensors="pt")
    device = lm.model.embed_tokens.weight.device
    ids, mask = enc.input_ids.to(device), enc.attention_mask.to(device)
    embeds = lm.model.embed_tokens(ids)
    if image is not None:
        if emu1:
            vec = model.cformer(model.ln_visual(model.visual.forward_features(image)))
        else:
            vec = model.encode_image(image)
            vec = lm.project_up(vec.reshape(-1, vec.shape[-1]))
        embeds[ids == tok.convert_tokens_to_ids("<image>")] = vec.reshape(-1, vec.shape[-1]).to(embeds.dtype)
    B, T = ids.shape
    last = T - 1 - mask.flip(1).argmax(1)  # index of each row's last real token
    # transformers >= 5.2x names the cache argument `cache`; older releases `past_key_values`.
    cache_arg = "cache" if "cache" in inspect.signature(lm.model.forward).parameters else "past_key_values"
    out = lm.model(inputs_embeds=embeds, attention_mask=mask, use_cache=True)
    cache = out[cache_arg]
    y = head(out.last_hidden_state[torch.arange(B, device=device), last])
    outs = [y]
    for k in range(1, n):
        x = y if emu1 else lm.project_up(y)
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        out = lm.model(inputs_embeds=x[:, None], attention_mask=mask, position_ids=(last + k)[:, None],
                       use_cache=True, **{cache_arg: cache})
        cache = out[cache_arg]
        y = head(out.last_hidden_state[:, -1])
        outs.append(y)
    return torch.stack(outs, dim=1)
