"""Quantizing an Emu model's decoder body in place, and the policy that decides its scheme.

    from emu_fast.quant.apply import quantize_decoder_linears_
    quantize_decoder_linears_(model, weights="int8")      # or "int4" (group_size=128)
    model.generate_image([...])                           # the model's own forward runs on them

Only the decoder body's projections are quantized (q/k/v/o_proj, gate/up/down_proj of each
LLaMA layer, found by the model walker emu_fast.dropin.walk). Embeddings, norms, lm_head, the
regression head and Emu2's project_up / project_down keep the model's dtype.

`emu_fast.accelerate(model, weights="int8" | "int4")` quantizes with quantize_decoder_linears_
(through prepare_quantization) and runs the decoder on these modules' buffers
(emu_fast.dropin.packing stacks q/k/v and gate/up in place, as it does for float weights); a
model quantized here, or loaded with emu_fast.quant.io.load_quantized, is accelerated as it is.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from ..dropin.model_checks import check_weights_loaded
from ..dropin.walk import LAYER_LINEARS, layer_linears, llama_body_of, llama_of
from .modules import QUANTIZED_MODULES, is_quantized
from .schemes import DEFAULT_GROUP_SIZE, GROUPED, check_group_size, scheme_named


def quantization_of(model) -> Optional[Tuple[str, Optional[int]]]:
    """(scheme, group_size) of a model whose decoder linears are all quantized, None when none
    is; ValueError when they are mixed."""
    found = {(m.scheme.name, m.group_size) if is_quantized(m) else None for _, _, _, m in layer_linears(model)}
    if found == {None}:
        return None
    if len(found) != 1:
        raise ValueError(f"emu_fast: the decoder's projections are quantized in different ways: {found}")
    return found.pop()


@torch.no_grad()
def quantize_decoder_linears_(model, weights: str = "int8", group_size: int = DEFAULT_GROUP_SIZE, device=None):
    """Replace, in place and layer by layer, each decoder layer's q/k/v/o_proj and
    gate/up/down_proj of an Emu1/Emu2 model (or a Hugging Face LLaMA) by an Int8Linear /
    Int4Linear, and return the model.

    Each original weight is released as soon as its layer is done (its Parameter is set to
    None), so memory only goes down: the peak is the model as given plus one projection's
    quantization temporaries (a few rows at a time). A weight that something else still
    references (tied, or packed by an earlier emu_fast.accelerate) stays alive through that
    reference.

    device: where the quantized layers go (default: where each projection is). A model loaded
    on the CPU is quantized onto the GPU layer by layer: each projection's float weight is
    copied over a chunk of rows at a time and quantized there, then the layer's norms follow, so
    the device holds the quantized layers done so far and one chunk of float rows, never a float
    layer. The rest of the model (embeddings, final norm, heads) is not moved here; accelerate
    moves it.

    weights: "int8" or "int4"; group_size: int4's group (a multiple of 32). ValueError on an
    unknown scheme, a bad device or a model already quantized; TypeError on a projection that is
    not a float nn.Linear with its weights loaded.
    """
    scheme = scheme_named(weights, "quantize_decoder_linears_")
    group = scheme.group(group_size, "quantize_decoder_linears_")
    device = resolve_device(device, "quantize_decoder_linears_")
    linears = list(layer_linears(model))
    for name, _, _, module in linears:
        if is_quantized(module):
            raise ValueError(f"emu_fast.quantize_decoder_linears_: the model is already quantized ({name} is a "
                             f"{type(module).__name__}); quantize the unquantized model once")
        if not isinstance(module, nn.Linear):
            raise TypeError(f"emu_fast: {name} must be a torch.nn.Linear to be quantized, got {type(module).__name__}")
        if not module.weight.is_floating_point():
            raise TypeError(f"emu_fast: {name} has {module.weight.dtype} weights; expected a float dtype")
    check_weights_loaded([(name, module) for name, _, _, module in linears])
    cls = QUANTIZED_MODULES[scheme.name]
    per_layer = len(LAYER_LINEARS)
    for i, layer in enumerate(llama_body_of(llama_of(model)).layers):
        for name, parent, attr, module in linears[i * per_layer:(i + 1) * per_layer]:
            setattr(parent, attr, cls.from_linear(module, device=device, group_size=group))
            module.weight = None  # frees the original unless another reference holds it
            module.bias = None
        if device is not None:
            layer.to(device)  # its norms (and transformers 4.31's RoPE buffers) follow its projections
    return model


def resolve_device(device, fn: str) -> Optional[torch.device]:
    """`device` as a torch.device (None stays None); ValueError naming a device that is not one,
    or one that is not there (CUDA without a GPU, an index past the last GPU)."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"emu_fast.{fn}: device={device!r} is not a torch device ({e})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"emu_fast.{fn}: device={device!r}, but CUDA is not available here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"emu_fast.{fn}: device={device!r}, but there are {torch.cuda.device_count()} GPUs")
    return dev


def replace_with_empty_(model, weights: str, group_size: int = DEFAULT_GROUP_SIZE):
    """Replace the decoder linears by quantized modules of the right shapes without computing
    anything (their buffers to be loaded: emu_fast.quant.io.load_quantized). Float weights
    are released as in quantize_decoder_linears_."""
    cls = QUANTIZED_MODULES[scheme_named(weights, "load_quantized").name]
    for name, parent, attr, module in list(layer_linears(model)):
        device = module.weight.device
        dtype = module.weight.dtype
        new = cls(module.in_features, module.out_features, module.bias is not None, dtype=dtype,
                  device="cpu" if device.type == "meta" else device, group_size=group_size)
        setattr(parent, attr, new)
        module.weight = None
    return model


def prepare_quantization(model, weights: Optional[str], group_size: Optional[int], fn: str = "accelerate",
                         apply: bool = True, device: Optional[torch.device] = None):
    """The decoder's scheme, (scheme, group_size or None), or None for float weights.

    weights None: the model's own (a model quantized by quantize_decoder_linears_ or loaded with
    load_quantized runs as it is; an unquantized one stays so). weights "int8" / "int4": the
    model's decoder linears are quantized now (group_size: int4's group, default 128), unless
    they already are, in which case the scheme (and a group_size given) must match. ValueError
    naming an unknown scheme or a mismatch, before anything changes; apply=False only checks.
    device: where quantize_decoder_linears_ puts the quantized layers (None: where they are)."""
    scheme = None if weights is None else scheme_named(weights, fn)
    if group_size is not None:
        if scheme is not None and not scheme.grouped:
            raise ValueError(f"emu_fast.{fn}: group_size is for {' / '.join(GROUPED)} weights; {scheme.name} has one "
                             "scale per output row")
        check_group_size(group_size, fn)
    current = quantization_of(model)
    if current is not None:
        name, group = current
        if (weights is not None and weights != name) or (group_size is not None and group_size != group):
            raise ValueError(f"emu_fast.{fn}: the model is already quantized as {name}"
                             f"{f' (group_size {group})' if group else ''}; asked for {weights or name}"
                             f"{f' (group_size {group_size})' if group_size else ''}. Pass weights=None to run it "
                             "as it is, or start from the unquantized model")
        return current
    if scheme is None:
        return None
    group = scheme.group(group_size, fn)
    if apply:
        quantize_decoder_linears_(model, weights, group or DEFAULT_GROUP_SIZE, device=device)
    return weights, group


def quantized_buffers(lm):
    """The qweight / scales tensors of the LLaMA's quantized projections (none when unquantized)."""
    return [t for _, _, _, m in layer_linears(lm) if is_quantized(m) for t in (m.qweight, m.scales)]
