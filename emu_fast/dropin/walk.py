"""The one model walker: where the Hugging Face LLaMA sits in a model, and its decoder layers'
projections, named as in the LLaMA's state dict. The checks (model_checks), the packer
(packing), quantizing in place and saving / loading (emu_fast.quant) all walk a model here."""
from __future__ import annotations

from typing import Iterator, NamedTuple

from torch import nn

from .families import family_of, find, is_emu_like

# The projections of a LLaMA decoder layer, in the order they are walked.
LAYER_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def llama_body_of(lm):
    """The LlamaModel inside a LlamaForCausalLM (or the model itself)."""
    return lm.model if hasattr(lm, "model") and hasattr(lm.model, "layers") else lm


def llama_of(model) -> nn.Module:
    """The Hugging Face LLaMA (LlamaForCausalLM or LlamaModel) inside an Emu1/Emu2 model, or
    the model itself when it is one."""
    if is_emu_like(model):
        family = family_of(model)  # TypeError saying what is missing, for an Emu-like model that is not one
        return family.lm(model)
    if hasattr(llama_body_of(model), "layers"):
        return model
    raise TypeError(f"emu_fast: {type(model).__name__} is neither an Emu model nor a Hugging Face LLaMA")


class Projection(NamedTuple):
    name: str            # "model.layers.0.self_attn.q_proj", as in the LLaMA's state dict
    parent: nn.Module    # the module holding it (to replace it: setattr(parent, attr, new))
    attr: str
    module: nn.Module


def layer_linears(model) -> Iterator[Projection]:
    """Each projection of each decoder layer of an Emu model or a Hugging Face LLaMA, layer by
    layer (LAYER_LINEARS' order within a layer); TypeError naming the first one missing."""
    lm = llama_of(model)
    body = llama_body_of(lm)
    prefix = "model." if body is not lm else ""
    for i, layer in enumerate(body.layers):
        for path in LAYER_LINEARS:
            parent_path, attr = path.rsplit(".", 1)
            parent = find(layer, parent_path)
            module = getattr(parent, attr, None) if parent is not None else None
            if module is None:
                raise TypeError(f"emu_fast: {prefix}layers.{i}.{path} is missing; not a Hugging Face LLaMA layer")
            yield Projection(f"{prefix}layers.{i}.{path}", parent, attr, module)
