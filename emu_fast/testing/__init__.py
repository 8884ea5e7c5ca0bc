"""Tiny random Emu1- and Emu2-shaped models for the tests, the benchmark and the README's
examples (needs transformers), with the real Emu tokenizer.

    from emu_fast.testing import tiny_emu
    model = tiny_emu()               # a tiny Emu1; tiny_emu("emu2") for Emu2
    model.generate_image(["a photo of a cat"])

The models have the attributes upstream's have (docs/model-classes.md; baaivision/Emu Emu1/models/
modeling_emu.py and Emu2/emu/emu.py) and a `generate_image` that runs upstream's recompute
loop (emu_fast.reference.upstream_generate_image) on Hugging Face modules, as upstream does.
The tokenizer is the real Emu1 (LLaMA) one, from a copy of its files carried in this package
(`emu_fast/data/emu1_tokenizer/`, the same as `../shared/emu/emu1_llama_config`; set
EMU_TOKENIZER_DIR to use another copy), with Emu's special tokens added as upstream adds them.
"""
from __future__ import annotations

import copy
import functools
import os
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from emu_fast import reference
from emu_fast.dropin.families import DEFAULT_PLACEHOLDER, family_named, family_of
from emu_fast.testing import hub_llama

VOCAB = 32004  # LLaMA's 32000 + [PAD], [IMG], [/IMG], <image>
TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "data" / "emu1_tokenizer"
# Emu adds these to the LLaMA tokenizer in this order, which gives them these ids.
EMU_SPECIAL_TOKENS = {"[PAD]": 32000, "[IMG]": 32001, "[/IMG]": 32002, "<image>": 32003}


@functools.lru_cache(maxsize=None)
def _load_tokenizer(path: str):
    tok = AutoTokenizer.from_pretrained(path)
    tok.add_special_tokens({"pad_token": "[PAD]"})
    tok.add_tokens(["[IMG]", "[/IMG]", "<image>"], special_tokens=True)
    ids = tok.convert_tokens_to_ids(list(EMU_SPECIAL_TOKENS))
    if ids != list(EMU_SPECIAL_TOKENS.values()):
        raise ValueError(f"emu_fast.testing: the tokenizer at {path} gives Emu's special tokens ids {ids}, "
                         f"expected {list(EMU_SPECIAL_TOKENS.values())}")
    return tok


def emu_tokenizer(path: Optional[str] = None, padding_side: str = "right"):
    """A fresh copy of the real Emu1 tokenizer with `[PAD]`=32000, `[IMG]`=32001, `[/IMG]`=32002,
    `<image>`=32003 (padding to the longest prompt with `[PAD]`). `path`: a directory holding the
    tokenizer files (default: $EMU_TOKENIZER_DIR, else the copy in this package)."""
    path = path or os.environ.get("EMU_TOKENIZER_DIR") or str(TOKENIZER_DIR)
    if not (Path(path) / "tokenizer.json").exists():
        raise FileNotFoundError(f"emu_fast.testing: no tokenizer.json in {path}")
    tok = copy.deepcopy(_load_tokenizer(str(path)))
    tok.padding_side = padding_side
    return tok


def tiny_llama(hidden=64, layers=2, heads=4, kv_heads=None, intermediate=96, vocab=VOCAB, seed=0,
               dtype=torch.float32, init_std=0.05) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads or heads, rms_norm_eps=1e-6,
                      initializer_range=init_std, pad_token_id=0)
    # Built directly in `dtype`: an Emu1-13B-shaped model in float32 and then cast would need
    # three times its bf16 size on the GPU at once.
    lm = _built_in(dtype, lambda: LlamaForCausalLM(cfg).eval())
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if name.endswith("norm.weight"):
                _random_norm_(p)
    return lm


def _built_in(dtype, build):
    """build() with `dtype` as torch's default dtype, so parameters are made in it directly."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return build()
    finally:
        torch.set_default_dtype(previous)


def _random_norm_(p):
    """Random RMSNorm weights around 1, so a wrong or missing norm shows."""
    p.copy_(1 + 0.2 * torch.randn_like(p))


def _hf_body(lm):
    def body(embeds, mask):
        out = lm.model(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True, return_dict=True)
        return out.hidden_states[-1]
    return body


@torch.no_grad()
def _upstream_generate_image(self, text, image=None, placeholder=DEFAULT_PLACEHOLDER):
    """Upstream's generate_image: the recompute loop on the model's own Hugging Face modules."""
    family = family_of(self)
    lm = self.decoder.lm
    prompt = None
    if image is not None:
        prompt = self.upstream_prompt_embeds(image)
        prompt = prompt.reshape(-1, prompt.shape[-1])
    return reference.upstream_generate_image(
        body=_hf_body(lm), embed_tokens=lm.model.embed_tokens, tokenizer=self.decoder.tokenizer,
        texts=text, n=family.n(self), image_placeholder=self.image_placeholder, regress=family.head(self),
        project_up=family.project_up(self), prompt_image_embeds=prompt, placeholder=placeholder,
        device=lm.model.embed_tokens.weight.device)


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


def _encode_image(visual, image, n_query):
    """Emu2's encode_image: the visual tokens (class token dropped) average-pooled to n_query."""
    x = visual(image)[:, 1:, :]  # [N, 16, C]
    b, n, c = x.shape
    side = int(n ** 0.5)
    x = x.permute(0, 2, 1).reshape(b, c, side, side)
    stride = int(side // (n_query ** 0.5))
    x = nn.functional.avg_pool2d(x, kernel_size=stride, stride=stride)
    return x.reshape(b, c, -1).permute(0, 2, 1).contiguous()


class _CFormer(nn.Module):
    """Stands in for Emu1's causal former: [N, P, width] -> [N, n_causal, hidden]."""

    def __init__(self, width, n, hidden):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(n, width) * 0.5)
        self.proj = nn.Linear(width, hidden)

    def forward(self, feats):
        attn = (self.queries @ feats.transpose(1, 2)).softmax(-1)
        return self.proj(attn @ feats)


class _TinyNativeEmu(nn.Module):
    """What the native stand-ins share: upstream's generate_image, and (_hold_lm) the LLaMA and
    the tokenizer at `decoder`, the tokenizer padding on the family's side, n under the family's
    attribute, the image placeholder. Subclasses build their vision parts and heads around it."""

    family: str

    def _hold_lm(self, tokenizer, lm: LlamaForCausalLM, n: int) -> None:
        family = family_named(self.family)
        self.decoder = nn.Module()
        self.decoder.lm = lm
        self.decoder.tokenizer = tokenizer
        tokenizer.padding_side = family.padding_side
        setattr(self, family.n_attribute, n)
        self.image_placeholder = "[IMG]" + "<image>" * n + "[/IMG]"

    generate_image = _upstream_generate_image


class TinyEmu1(_TinyNativeEmu):
    family, default_n = "emu1", 8

    def __init__(self, tokenizer, lm: LlamaForCausalLM, n_causal=8, vision_width=24):
        super().__init__()
        hidden, dtype = lm.config.hidden_size, lm.model.embed_tokens.weight.dtype
        self._hold_lm(tokenizer, lm, n_causal)
        lm.stu_regress_head = nn.Linear(hidden, hidden, bias=False).to(dtype)
        self.visual = _Visual(vision_width).to(dtype)
        self.ln_visual = nn.LayerNorm(vision_width).to(dtype)
        self.cformer = _CFormer(vision_width, n_causal, hidden).to(dtype)

    def upstream_prompt_embeds(self, image):
        """Emu1/models/modeling_emu.py: visual.forward_features -> ln_visual -> cformer."""
        return self.cformer(self.ln_visual(self.visual.forward_features(image)))


class TinyEmu2(_TinyNativeEmu):
    family, default_n = "emu2", 16

    def __init__(self, tokenizer, lm: LlamaForCausalLM, n_query=16, vision_width=40):
        super().__init__()
        hidden, dtype = lm.config.hidden_size, lm.model.embed_tokens.weight.dtype
        self.visual = _Visual(vision_width).to(dtype)
        self._hold_lm(tokenizer, lm, n_query)
        tokenizer.truncation_side = tokenizer.padding_side
        lm.project_up = nn.Linear(vision_width, hidden, bias=False).to(dtype)
        lm.project_down = nn.Linear(hidden, vision_width, bias=False).to(dtype)

    @torch.no_grad()
    def encode_image(self, image):
        return _encode_image(self.visual, image, self.n_query)

    def upstream_prompt_embeds(self, image):
        """Emu2/emu/emu.py: encode_image -> project_up."""
        x = self.encode_image(image)
        return self.decoder.lm.project_up(x)


class _EmuModel(nn.Module):
    """The hub's EmuModel: `.visual` (EVA-CLIP there), `.decoder.lm`, `encode_image`."""

    def __init__(self, config):
        super().__init__()
        self.visual = _Visual(config.d_model)
        self.decoder = nn.Module()
        self.decoder.lm = hub_llama.LlamaForCausalLM(config)
        self.n_query = config.vision_config["n_query"]

    @torch.no_grad()
    def encode_image(self, image):
        return _encode_image(self.visual, image, self.n_query)


class TinyEmu2Hub(nn.Module):
    """The hub class (BAAI/Emu2, Emu2-Gen's multimodal_encoder: `EmuForCausalLM` of the remote
    code), restated: `.model` holds `.visual` and `.decoder.lm` (the remote code's own 4.31-era
    LLaMA, emu_fast.hub_llama), `project_down` / `project_up`, `n_query` and `image_placeholder`
    on this outer class, no tokenizer: `generate_image(text, tokenizer, image=None, placeholder)`."""

    default_n = 16

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = _EmuModel(config)
        self.project_down = nn.Linear(config.hidden_size, config.d_model, bias=False)
        self.project_up = nn.Linear(config.d_model, config.hidden_size, bias=False)
        self.n_query = config.vision_config["n_query"]
        self.image_placeholder = "[IMG]" + "<image>" * self.n_query + "[/IMG]"

    @torch.no_grad()
    def generate_image(self, text, tokenizer, image=None, placeholder=DEFAULT_PLACEHOLDER):
        """Upstream's loop, the tokenizer given (padding on its own side)."""
        lm = self.model.decoder.lm
        prompt = None
        if image is not None:
            prompt = self.project_up(self.model.encode_image(image))
            prompt = prompt.reshape(-1, prompt.shape[-1])
        return reference.upstream_generate_image(
            body=_hf_body(lm), embed_tokens=lm.model.embed_tokens, tokenizer=tokenizer, texts=text, n=self.n_query,
            image_placeholder=self.image_placeholder, regress=self.project_down, project_up=self.project_up,
            prompt_image_embeds=prompt, placeholder=placeholder, device=lm.model.embed_tokens.weight.device)


def tiny_emu2_hub_config(hidden=64, layers=2, heads=4, intermediate=96, n=16, d_model=40, vocab=VOCAB):
    """The hub model's EmuConfig (LLaMA sizes, d_model, vision_config with n_query), tiny."""
    return hub_llama.EmuConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                               num_hidden_layers=layers, num_attention_heads=heads, rms_norm_eps=1e-6,
                               d_model=d_model, vision_config={"n_query": n, "v_query": n, "width": d_model})


def tiny_emu2_hub(*, n=None, device=None, dtype=torch.float32, seed=0, init_std=0.05, **shape) -> TinyEmu2Hub:
    """A tiny random hub-class Emu2 (its tokenizer comes separately: emu_tokenizer(padding_side=...))."""
    torch.manual_seed(seed)
    model = _built_in(dtype, lambda: TinyEmu2Hub(tiny_emu2_hub_config(n=n or TinyEmu2Hub.default_n, **shape)).eval())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                _random_norm_(p)
            elif p.dim() == 2:
                p.normal_(0, init_std)
    return model if device is None else model.to(device)


def tiny_emu(kind: str = "emu1", *, n: Optional[int] = None, tokenizer=None, device=None, hidden: int = 64,
             layers: int = 2, heads: int = 4, kv_heads: Optional[int] = None, intermediate: int = 96,
             dtype=torch.float32, seed: int = 0, init_std: float = 0.05) -> nn.Module:
    """A whole tiny random Emu model of family `kind` ("emu1" or "emu2") in one call: LLaMA of the
    given shape, the real tokenizer, stand-in vision parts; n embeddings per image (default 8 for
    Emu1, 16 for Emu2: small, and a square for Emu2's pooling)."""
    family = family_named(kind)
    lm = tiny_llama(hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, intermediate=intermediate,
                    seed=seed, dtype=dtype, init_std=init_std)
    tok = tokenizer if tokenizer is not None else emu_tokenizer()
    if family.name not in TINY_MODELS:
        raise ValueError(f"emu_fast.testing: tiny_emu builds {', '.join(TINY_MODELS)}; the hub class (no tokenizer "
                         "of its own) is tiny_emu2_hub()")
    cls = TINY_MODELS[family.name]
    model = cls(tok, lm, **{family.n_attribute: n or cls.default_n})
    return model if device is None else model.to(device)


TINY_MODELS = {"emu1": TinyEmu1, "emu2": TinyEmu2}  # a stand-in for each family's upstream model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest relative error of a against b over output vectors (last dim)."""
    a, b = a.float(), b.float()
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-30)).max())
