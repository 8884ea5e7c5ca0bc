"""The drop-in: emu_fast.accelerate(model) swaps an Emu model's generate_image for the KV-cached
path. Same signature, same result (up to float rounding), on the model's own device and dtype.

Emu1-style models (baaivision/Emu, Emu1/models/modeling_emu.py) carry `decoder.lm` (a Hugging
Face LlamaForCausalLM with `stu_regress_head`), `decoder.tokenizer`, `n_causal`,
`image_placeholder`, and for prompt images `visual.forward_features`, `ln_visual`, `cformer`.
Emu2-style models (Emu2/emu/emu.py) carry `decoder.lm`, `decoder.tokenizer`, `n_query`,
`image_placeholder`, `encode_image`, and `project_up`/`project_down` (on `decoder.lm`, as
upstream, or on the model).
"""
from __future__ import annotations

import types
from typing import List, Optional

import torch

from .decoder import EmuDecoder

DEFAULT_PLACEHOLDER = "[<IMG_PLH>]"


def _find(obj, path: str):
    for name in path.split("."):
        if not hasattr(obj, name):
            return None
        obj = getattr(obj, name)
    return obj


def _missing(model, paths) -> List[str]:
    return [p for p in paths if _find(model, p) is None]


def _kind(model) -> str:
    common = ["decoder.lm.model.layers", "decoder.lm.model.embed_tokens", "decoder.lm.model.norm",
              "decoder.tokenizer", "image_placeholder", "generate_image"]
    emu1 = _missing(model, common + ["decoder.lm.stu_regress_head", "n_causal"])
    if not emu1:
        return "emu1"
    up = "decoder.lm.project_up" if _find(model, "decoder.lm.project_up") is not None else "project_up"
    down = "decoder.lm.project_down" if _find(model, "decoder.lm.project_down") is not None else "project_down"
    emu2 = _missing(model, common + ["n_query", "encode_image", up, down])
    if not emu2:
        return "emu2"
    raise TypeError(
        f"emu_fast.accelerate: {type(model).__name__} is neither an Emu1-style model (missing: "
        f"{', '.join(emu1)}) nor an Emu2-style one (missing: {', '.join(emu2)})")


def _linear_weight(module, name: str) -> torch.Tensor:
    if not isinstance(module, torch.nn.Linear):
        raise TypeError(f"emu_fast.accelerate: {name} must be a torch.nn.Linear, got {type(module).__name__}")
    if module.bias is not None:
        raise TypeError(f"emu_fast.accelerate: {name} has a bias; Emu's is bias-free and emu_fast assumes so")
    return module.weight


def _regression_modules(model, kind):
    """(head, up): Emu1's stu_regress_head and no up; Emu2's project_down and project_up."""
    lm = model.decoder.lm
    if kind == "emu1":
        return lm.stu_regress_head, None
    owner = lm if hasattr(lm, "project_up") else model
    return owner.project_down, owner.project_up


def _weight_addresses(model, kind):
    """Where every weight the decoder reads lives, to notice later if the model's weights were
    replaced or moved (load_state_dict(assign=True), .to(), ...)."""
    from .packing import _body

    body = _body(model.decoder.lm)
    head, up = _regression_modules(model, kind)
    addresses = [p.data_ptr() for p in body.parameters() if p is not body.embed_tokens.weight]
    return addresses + [m.weight.data_ptr() for m in (head, up) if m is not None]


def accelerate(model, *, max_batch: int = 4, max_seq_len: int = 1024):
    """Replace `model.generate_image` (this instance only) with the emu_fast path and return the
    model. The KV cache holds `max_batch` prompts of up to `max_seq_len` tokens (prompt + n
    generated embeddings); larger requests raise ValueError. The original method stays at
    `model._emu_fast_original_generate_image`; `model.emu_fast_decoder` is the EmuDecoder."""
    kind = _kind(model)
    head_module, up_module = _regression_modules(model, kind)
    head = _linear_weight(head_module, "decoder.lm.stu_regress_head" if kind == "emu1" else "project_down")
    up = None if up_module is None else _linear_weight(up_module, "project_up")
    n = int(model.n_causal if kind == "emu1" else model.n_query)
    decoder = EmuDecoder.from_llama(model.decoder.lm, head, up, max_batch=max_batch, max_seq_len=max_seq_len)
    if not hasattr(model, "_emu_fast_original_generate_image"):
        model._emu_fast_original_generate_image = model.generate_image
    model.emu_fast_decoder = decoder
    model._emu_fast_kind = kind
    model._emu_fast_n = n
    model._emu_fast_weights = _weight_addresses(model, kind)
    model.generate_image = types.MethodType(_generate_image, model)
    return model


def _prompt_image_embeds(model, image: torch.Tensor) -> torch.Tensor:
    """Prompt images -> [N*n, H] vectors exactly as upstream encodes them."""
    if model._emu_fast_kind == "emu1":
        missing = _missing(model, ["visual.forward_features", "ln_visual", "cformer"])
        if missing:
            raise TypeError(f"emu_fast: prompt images need the model's {', '.join(missing)}")
        x = model.cformer(model.ln_visual(model.visual.forward_features(image)))
    else:
        _, up = _regression_modules(model, "emu2")
        x = model.encode_image(image)
        x = up(x.reshape(-1, x.shape[-1]))
    return x.reshape(-1, x.shape[-1])


@torch.no_grad()
def _generate_image(self, text: List[str], image: Optional[torch.Tensor] = None,
                    placeholder: str = DEFAULT_PLACEHOLDER) -> torch.Tensor:
    if isinstance(text, str) or not all(isinstance(t, str) for t in text):
        raise TypeError("emu_fast: generate_image takes a list of prompt strings")
    if len(text) == 0:
        raise ValueError("emu_fast: generate_image got an empty list of prompts")
    decoder: EmuDecoder = self.emu_fast_decoder
    lm = self.decoder.lm
    if _weight_addresses(self, self._emu_fast_kind) != self._emu_fast_weights:
        raise RuntimeError("emu_fast: the model's weights were replaced or moved after emu_fast.accelerate "
                           "(load_state_dict(assign=True), .to(), ...); call emu_fast.accelerate(model) again")
    if len(text) > decoder.max_batch:
        raise ValueError(f"emu_fast: {len(text)} prompts exceed the decoder's max_batch of {decoder.max_batch} "
                         f"(pass a larger max_batch to emu_fast.accelerate)")
    tokenizer = self.decoder.tokenizer
    table = lm.model.embed_tokens.weight
    image_id = tokenizer.convert_tokens_to_ids("<image>")

    # Tokenize once: the prompt (placeholders expanded) and the trailing [IMG]. Every later
    # step appends one slot whose input is the previous output, so the cache covers the rest.
    texts = [t.replace(placeholder, self.image_placeholder) + "[IMG]" for t in text]
    tok = tokenizer(texts, padding="longest", return_tensors="pt")
    ids = tok.input_ids.to(table.device)
    mask = tok.attention_mask

    n_slots = int((ids == image_id).sum())
    if image is not None:
        vectors = _prompt_image_embeds(self, image).to(table.dtype)
        if vectors.shape[0] != n_slots:
            raise ValueError(
                f"emu_fast: the prompts have {n_slots} <image> slots but the prompt images give "
                f"{vectors.shape[0]} vectors ({image.shape[0]} image(s) x {vectors.shape[0] // max(1, image.shape[0])})")
        embeds = torch.ops.emu_fast.splice_embeddings(ids, table.detach(), vectors, image_id)
    else:
        # Upstream leaves the <image> token's own embedding in unfilled prompt slots.
        embeds = torch.ops.emu_fast.splice_embeddings(ids, table.detach(), table.new_empty(0, table.shape[1]), -1)
    return decoder.generate(embeds, mask, self._emu_fast_n)
