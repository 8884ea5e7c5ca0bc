"""Everything that differs between Emu model families, in one place.

`accelerate`, the tiny test models and the benchmark ask `family_of(model)` (or
`family_named("emu1")`) instead of branching on the family themselves. Adding a third variant
means one new `EmuFamily` subclass here, appended to FAMILIES.

What a family says (SEMANTICS.md has the upstream code these come from):
- which attributes identify it (`required`), and which modules hold its regression head and,
  for Emu2, the `project_up` that maps an output back to the next input;
- n, the embeddings per image (Emu1 `n_causal` = 32, Emu2 `n_query` = 64);
- the tokenizer's padding side (Emu1 right, Emu2 left);
- how prompt images become `<image>`-slot vectors, and how prompt text is prepared.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import nn

DEFAULT_PLACEHOLDER = "[<IMG_PLH>]"  # what users write where a prompt image goes
# The attributes every family's model has: a Hugging Face LLaMA with a tokenizer under
# `decoder`, the expanded image placeholder, and upstream's own generate_image.
COMMON = ["decoder.lm.model.layers", "decoder.lm.model.embed_tokens", "decoder.lm.model.norm",
          "decoder.tokenizer", "image_placeholder", "generate_image"]


def find(obj, path: str):
    """obj.a.b.c for path "a.b.c", or None where an attribute is missing."""
    for name in path.split("."):
        if not hasattr(obj, name):
            return None
        obj = getattr(obj, name)
    return obj


def missing(obj, paths: Sequence[str]) -> List[str]:
    return [p for p in paths if find(obj, p) is None]


class EmuFamily:
    """One Emu variant. Subclasses fill in the class attributes and the methods below."""

    name: str
    padding_side: str          # the tokenizer's padding side upstream
    n_attribute: str           # the model attribute that holds n
    default_n: int             # n of the released models
    required: List[str]        # attributes beyond COMMON that identify the family

    def missing(self, model) -> List[str]:
        """What `model` lacks to be of this family ([] when it is)."""
        return missing(model, COMMON + self.required)

    def n(self, model) -> int:
        return int(getattr(model, self.n_attribute))

    def head_name(self, model) -> str:
        """Where the regression head (hidden state -> output vector) sits, e.g.
        "decoder.lm.stu_regress_head"."""
        raise NotImplementedError

    def up_name(self, model) -> Optional[str]:
        """Where `project_up` (output vector -> next input embedding) sits, or None when the
        output is fed back as is."""
        return None

    def head(self, model) -> nn.Module:
        return find(model, self.head_name(model))

    def project_up(self, model) -> Optional[nn.Module]:
        name = self.up_name(model)
        return None if name is None else find(model, name)

    def prompt_image_embeds(self, model, image: torch.Tensor) -> torch.Tensor:
        """Prompt images [N, 3, h, w] -> [N * n, hidden] vectors for the `<image>` slots, as
        upstream encodes them."""
        raise NotImplementedError

    def prompt_texts(self, model, texts: Sequence[str], placeholder: str = DEFAULT_PLACEHOLDER) -> List[str]:
        """The strings generate_image tokenizes once: each placeholder expanded to the model's
        `[IMG]<image>*n[/IMG]`, then the `[IMG]` that opens the image being generated."""
        return [t.replace(placeholder, model.image_placeholder) + "[IMG]" for t in texts]

    def __repr__(self) -> str:
        return f"<emu_fast family {self.name}>"


class Emu1(EmuFamily):
    """baaivision/Emu Emu1/models/modeling_emu.py: `decoder.lm.stu_regress_head`, fed back as is;
    prompt images through `visual.forward_features` -> `ln_visual` -> `cformer`."""

    name = "emu1"
    padding_side = "right"
    n_attribute = "n_causal"
    default_n = 32
    required = ["decoder.lm.stu_regress_head", "n_causal"]

    def head_name(self, model):
        return "decoder.lm.stu_regress_head"

    def prompt_image_embeds(self, model, image):
        lacking = missing(model, ["visual.forward_features", "ln_visual", "cformer"])
        if lacking:
            raise TypeError(f"emu_fast: prompt images need the model's {', '.join(lacking)}")
        x = model.cformer(model.ln_visual(model.visual.forward_features(image)))
        return x.reshape(-1, x.shape[-1])


class Emu2(EmuFamily):
    """baaivision/Emu Emu2/emu/emu.py: `project_down` regresses, `project_up` feeds back (both on
    `decoder.lm` as upstream, or on the model); prompt images through `encode_image` ->
    `project_up`."""

    name = "emu2"
    padding_side = "left"
    n_attribute = "n_query"
    default_n = 64

    required = ["n_query", "encode_image"]

    def missing(self, model):
        lacking = super().missing(model)
        for name in ("project_up", "project_down"):  # on decoder.lm (upstream) or on the model
            if find(model, "decoder.lm." + name) is None and find(model, name) is None:
                lacking.append(name)
        return lacking

    def _prefix(self, model):
        return "decoder.lm." if hasattr(model.decoder.lm, "project_up") else ""

    def head_name(self, model):
        return self._prefix(model) + "project_down"

    def up_name(self, model):
        return self._prefix(model) + "project_up"

    def prompt_image_embeds(self, model, image):
        x = model.encode_image(image)
        x = self.project_up(model)(x.reshape(-1, x.shape[-1]))
        return x.reshape(-1, x.shape[-1])


FAMILIES: List[EmuFamily] = [Emu1(), Emu2()]


def family_named(name: str) -> EmuFamily:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ValueError(f"emu_fast: unknown Emu family {name!r}; known: {', '.join(f.name for f in FAMILIES)}")


def family_of(model) -> EmuFamily:
    """The family `model` belongs to; TypeError saying what each family would need otherwise."""
    reasons = []
    for family in FAMILIES:
        lacking = family.missing(model)
        if not lacking:
            return family
        reasons.append(f"an {family.name.capitalize()}-style model (missing: {', '.join(lacking)})")
    raise TypeError(f"emu_fast.accelerate: {type(model).__name__} is neither " + " nor ".join(reasons))
