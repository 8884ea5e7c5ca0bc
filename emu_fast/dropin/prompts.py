"""Prompts to the decoder's inputs, as upstream's generate_image prepares them once: each
placeholder expanded to `[IMG]<image>*n[/IMG]`, the `[IMG]` that opens the image to generate
appended, tokenized with padding to the longest (on the tokenizer's own side), embedded, and the
prompt images' vectors spliced into the `<image>` slots in row-major order. Shared by the
drop-in (emu_fast.accelerate) and the loader (emu_fast.from_pretrained)."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from .families import DEFAULT_PLACEHOLDER, check_tokenizer, expand_prompts


def image_placeholder(n: int) -> str:
    """What one prompt image stands for in the text: `[IMG]`, n `<image>` slots, `[/IMG]`."""
    return "[IMG]" + "<image>" * n + "[/IMG]"


def check_request(text, placeholder: str = DEFAULT_PLACEHOLDER) -> List[str]:
    """The prompts as a list of strings; TypeError / ValueError naming what is wrong."""
    if isinstance(text, str) or not isinstance(text, (list, tuple)) or not all(isinstance(t, str) for t in text):
        raise TypeError("emu_fast: generate_image takes a list of prompt strings")
    if len(text) == 0:
        raise ValueError("emu_fast: generate_image got an empty list of prompts")
    if not isinstance(placeholder, str) or not placeholder:
        raise TypeError(f"emu_fast: placeholder must be a non-empty string, got {placeholder!r}")
    return list(text)


@torch.no_grad()
def embed_prompts(tokenizer, table: torch.Tensor, texts: Sequence[str], expanded: str,
                  placeholder: str = DEFAULT_PLACEHOLDER,
                  slot_vectors: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(inputs_embeds [B, T, H] on the table's device, attention_mask [B, T]) for `texts`, each
    `placeholder` replaced by `expanded` (image_placeholder(n)) and `[IMG]` appended. With
    `slot_vectors` [slots, H] (the prompt images' vectors), they fill the `<image>` slots;
    without, those slots keep the `<image>` token's own embedding, as upstream leaves them."""
    check_tokenizer(tokenizer, table.shape[0])
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    tok = tokenizer(expand_prompts(texts, expanded, placeholder), padding="longest", return_tensors="pt")
    ids = tok.input_ids.to(table.device)
    n_slots = int((ids == image_id).sum())
    if slot_vectors is not None:
        if slot_vectors.dim() != 2 or slot_vectors.shape[0] != n_slots or slot_vectors.shape[1] != table.shape[1]:
            raise ValueError(f"emu_fast: the prompts have {n_slots} <image> slots but the prompt images give "
                             f"{slot_vectors.shape[0] if slot_vectors.dim() == 2 else tuple(slot_vectors.shape)} "
                             f"vectors of size {slot_vectors.shape[-1]} (the slots take vectors of size "
                             f"{table.shape[1]})")
        embeds = torch.ops.emu_fast.splice_embeddings(ids, table.detach(), slot_vectors.to(table), image_id)
    else:
        embeds = torch.ops.emu_fast.splice_embeddings(ids, table.detach(), table.new_empty(0, table.shape[1]), -1)
    return embeds, tok.attention_mask
