"""Everything that differs between Emu model classes, in one place.

`accelerate`, the quantized save / load, the tiny test models and the benchmark ask
`family_of(model)` (or `family_named("emu1")`) instead of branching on the class themselves.
Adding a variant means one new `EmuFamily` subclass here, appended to FAMILIES.

What a family says (docs/model-classes.md has the upstream code these come from):
- where the Hugging Face-style LLaMA sits (`lm_path`) and where the tokenizer does
  (`tokenizer_path`; None when `generate_image` takes it as an argument);
- which attributes identify it (`required`), and which modules hold its regression head and,
  for Emu2, the `project_up` that maps an output back to the next input;
- n, the embeddings per image (Emu1 `n_causal` = 32, Emu2 `n_query` = 64);
- the padding side of the tokenizer it ships with (Emu1 right, Emu2 left; a tokenizer given to
  `generate_image` pads as it is set to);
- how prompt images become `<image>`-slot vectors, and how prompt text is prepared;
- the signature of its `generate_image`, which the accelerated one keeps.
"""
from __future__ import annotations

import inspect
from typing import List, Optional, Sequence

import torch
from torch import nn

DEFAULT_PLACEHOLDER = "[<IMG_PLH>]"  # what users write where a prompt image goes
# The tokens Emu adds to the LLaMA tokenizer; generate_image cannot run without them.
EMU_TOKENS = ("[IMG]", "[/IMG]", "<image>")


def expand_prompts(texts: Sequence[str], image_placeholder: str, placeholder: str = DEFAULT_PLACEHOLDER) -> List[str]:
    """Each placeholder replaced by `image_placeholder` (`[IMG]<image>*n[/IMG]`), then the `[IMG]`
    that opens the image being generated appended: the strings generate_image tokenizes once."""
    return [t.replace(placeholder, image_placeholder) + "[IMG]" for t in texts]


def find(obj, path: str):
    """obj.a.b.c for path "a.b.c", or None where an attribute is missing."""
    for name in path.split("."):
        if not hasattr(obj, name):
            return None
        obj = getattr(obj, name)
    return obj


def missing(obj, paths: Sequence[str]) -> List[str]:
    return [p for p in paths if find(obj, p) is None]


# The two generate_image signatures upstream has (the accelerated method binds its arguments
# with the model's and keeps its defaults and keyword names).
def _own_tokenizer_call(text, image=None, placeholder=DEFAULT_PLACEHOLDER):
    """Emu1 / native Emu2: the model holds its tokenizer."""


def _tokenizer_argument_call(text, tokenizer, image=None, placeholder=DEFAULT_PLACEHOLDER):
    """The hub class: the tokenizer is an argument."""


class EmuFamily:
    """One Emu model class. Subclasses fill in the class attributes and the methods below."""

    name: str
    padding_side: str                           # the padding side of the tokenizer it ships with
    n_attribute: str                            # the model attribute that holds n
    default_n: int                              # n of the released models
    required: List[str]                         # attributes beyond the LLaMA's that identify it
    lm_path: str = "decoder.lm"                 # the LlamaForCausalLM
    tokenizer_path: Optional[str] = "decoder.tokenizer"  # None: generate_image takes one
    call = staticmethod(_own_tokenizer_call)    # generate_image's signature (without self)

    def identifying(self) -> List[str]:
        """Every attribute path a model of this family has."""
        lm = self.lm_path
        paths = [f"{lm}.model.layers", f"{lm}.model.embed_tokens", f"{lm}.model.norm", "image_placeholder",
                 "generate_image"]
        return paths + ([self.tokenizer_path] if self.tokenizer_path else []) + self.required

    def missing(self, model) -> List[str]:
        """What `model` lacks to be of this family ([] when it is)."""
        return missing(model, self.identifying())

    def lm(self, model) -> nn.Module:
        """The model's Hugging Face-style LlamaForCausalLM."""
        return find(model, self.lm_path)

    def tokenizer(self, model, given=None):
        """The tokenizer generate_image runs with: the model's own, or the one given to it (the
        hub class). TypeError when the call and the class disagree."""
        if self.tokenizer_path is None:
            if given is None:
                raise TypeError(f"emu_fast: {type(model).__name__}.generate_image needs the tokenizer as an argument "
                                "(generate_image(text, tokenizer, ...), as the Emu2-Gen pipeline passes it)")
            return given
        if given is not None:
            raise TypeError(f"emu_fast: {type(model).__name__} ({self.name}) has its own tokenizer "
                            f"(model.{self.tokenizer_path}); its generate_image takes none: drop the tokenizer "
                            "argument")
        return find(model, self.tokenizer_path)

    def signature(self) -> inspect.Signature:
        return inspect.signature(self.call)

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
        return expand_prompts(texts, model.image_placeholder, placeholder)

    def __repr__(self) -> str:
        return f"<emu_fast family {self.name}>"


class Emu1(EmuFamily):
    """baaivision/Emu Emu1/models/modeling_emu.py: `decoder.lm.stu_regress_head`, fed back as is;
    prompt images through `visual.forward_features` -> `ln_visual` -> `cformer`."""

    name, padding_side, n_attribute, default_n = "emu1", "right", "n_causal", 32
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

    name, padding_side, n_attribute, default_n = "emu2", "left", "n_query", 64
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

    def encode_image(self, model, image):
        return model.encode_image(image)

    def prompt_image_embeds(self, model, image):
        x = self.encode_image(model, image)
        x = self.project_up(model)(x.reshape(-1, x.shape[-1]))
        return x.reshape(-1, x.shape[-1])


class Emu2Hub(Emu2):
    """The Hugging Face hub class (BAAI/Emu2, Emu2-Gen's `multimodal_encoder`: remote code
    `modeling_emu.py` `EmuForCausalLM`): the LLaMA at `model.decoder.lm` (the remote code's own
    4.31-era copy), `project_down` / `project_up`, `n_query` and `image_placeholder` on the outer
    class, no tokenizer attribute (generate_image(text, tokenizer, image=None, placeholder=...)),
    prompt images through `model.encode_image` -> `project_up`. Emu2's loop otherwise."""

    name = "emu2-hub"
    lm_path = "model.decoder.lm"
    tokenizer_path = None
    call = staticmethod(_tokenizer_argument_call)
    required = ["n_query", "model.encode_image", "project_down", "project_up"]

    def missing(self, model):
        return EmuFamily.missing(self, model)

    def head_name(self, model):
        return "project_down"

    def up_name(self, model):
        return "project_up"

    def encode_image(self, model, image):
        return model.model.encode_image(image)


FAMILIES: List[EmuFamily] = [Emu1(), Emu2(), Emu2Hub()]


def family_named(name: str) -> EmuFamily:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ValueError(f"emu_fast: unknown Emu family {name!r}; known: {', '.join(f.name for f in FAMILIES)}")


def is_emu_like(model) -> bool:
    """Whether `model` holds a LLaMA where some family keeps one (an Emu model, or one that is
    broken in another way: family_of says how), rather than being a LLaMA itself."""
    return any(find(model, f.lm_path) is not None for f in FAMILIES)


def family_of(model) -> EmuFamily:
    """The family `model` belongs to; TypeError saying what each family would need otherwise
    (the closest first: a model of a known class with a part missing is told that part)."""
    lacking = {}
    for family in FAMILIES:
        lacking[family.name] = family.missing(model)
        if not lacking[family.name]:
            return family
    closest = sorted(lacking.items(), key=lambda item: len(item[1]))
    reasons = "; ".join(f"as {name} it lacks {', '.join(paths)}" for name, paths in closest)
    raise TypeError(f"emu_fast: {type(model).__name__} is not an Emu model emu_fast knows "
                    f"({', '.join(f.name for f in FAMILIES)}): {reasons}")


def check_tokenizer(tokenizer, vocab_size: int) -> None:
    """The tokenizer has Emu's `[IMG]`, `[/IMG]` and `<image>` as single tokens within the
    model's vocabulary, and pads (generate_image batches prompts of different lengths)."""
    if not callable(tokenizer) or not hasattr(tokenizer, "convert_tokens_to_ids"):
        raise TypeError(f"emu_fast: the tokenizer must be a Hugging Face tokenizer, got {type(tokenizer).__name__}")
    ids = tokenizer.convert_tokens_to_ids(list(EMU_TOKENS))
    unk = getattr(tokenizer, "unk_token_id", None)
    lacking = [t for t, i in zip(EMU_TOKENS, ids) if i is None or i == unk or not 0 <= i < vocab_size]
    if lacking:
        raise ValueError(f"emu_fast: the tokenizer lacks Emu's {', '.join(lacking)} token(s) (within the model's "
                         f"{vocab_size} embeddings); add them as Emu does: "
                         "tokenizer.add_tokens(['[IMG]', '[/IMG]', '<image>'], special_tokens=True)")
    if getattr(tokenizer, "pad_token_id", None) is None:
        raise ValueError("emu_fast: the tokenizer has no pad token; Emu's is '[PAD]' "
                         "(tokenizer.add_special_tokens({'pad_token': '[PAD]'}))")
