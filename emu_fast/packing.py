"""Fused QKV and gate/up weights for EmuDecoder, made without keeping a second copy.

Each group of projections is copied once into one packed tensor and the Hugging Face modules'
parameters are re-pointed at views of it, so the original storage is freed and the model keeps
working unchanged (its forward reads the same values through the views). Packing twice is a
no-op: the second call finds the views and returns the packed tensor they share.
"""
from __future__ import annotations

import ctypes
import functools
import platform
from typing import List, Sequence

import torch
from torch import nn

from .layer_weights import LayerWeights
from .model_checks import check_llama_modules


def _packed_base(linears: Sequence[nn.Linear]):
    """The packed tensor these linears' weights are consecutive views of, or None."""
    base = getattr(linears[0], "_emu_fast_packed", None)
    if base is None:
        return None
    row = 0
    for lin in linears:
        w = lin.weight
        view = base[row : row + w.shape[0]]
        if w.data_ptr() != view.data_ptr() or w.shape != view.shape or not w.is_contiguous():
            return None
        row += w.shape[0]
    return base if row == base.shape[0] else None


@torch.no_grad()
def pack_linears(linears: Sequence[nn.Linear]) -> torch.Tensor:
    """Stack the weights of bias-free linears on dim 0 into one tensor; re-point each module's
    weight at its slice. Returns the packed [sum(out), in] tensor."""
    for lin in linears:
        if getattr(lin, "bias", None) is not None:
            raise ValueError(f"emu_fast: {type(lin).__name__} has a bias; LLaMA projections are bias-free")
    base = _packed_base(linears)
    if base is not None:
        return base
    ws = [lin.weight for lin in linears]
    k = ws[0].shape[1]
    if any(w.shape[1] != k or w.dtype != ws[0].dtype or w.device != ws[0].device for w in ws):
        raise ValueError("emu_fast: projections to pack differ in input size, dtype or device")
    base = torch.empty(sum(w.shape[0] for w in ws), k, dtype=ws[0].dtype, device=ws[0].device)
    row = 0
    for lin in linears:
        n = lin.weight.shape[0]
        base[row : row + n].copy_(lin.weight)
        lin.weight.data = base[row : row + n]  # the old storage is released here
        row += n
    linears[0]._emu_fast_packed = base
    if base.device.type == "cpu":  # so the peak stays at the weights plus one packed buffer
        _release_freed_host_memory()
    return base


@torch.no_grad()
def pack_llama_layers(lm) -> List[List[torch.Tensor]]:
    """Per decoder layer of a Hugging Face LLaMA, [input_norm, qkv, o, post_norm, gate_up, down]
    as EmuDecoder takes them; packs QKV and gate/up in place. Every layer is checked before the
    first is packed (model_checks: quantized or non-Linear projections, non-float weights)."""
    body = llama_body_of(lm)
    check_llama_modules(body)
    layers = []
    for layer in body.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if getattr(attn.o_proj, "bias", None) is not None or getattr(mlp.down_proj, "bias", None) is not None:
            raise ValueError("emu_fast: biased o_proj/down_proj are not LLaMA's; not supported")
        layers.append(LayerWeights(
            input_norm=layer.input_layernorm.weight.detach(),
            qkv=pack_linears([attn.q_proj, attn.k_proj, attn.v_proj]),
            o=attn.o_proj.weight.detach(),
            post_norm=layer.post_attention_layernorm.weight.detach(),
            gate_up=pack_linears([mlp.gate_proj, mlp.up_proj]),
            down=mlp.down_proj.weight.detach(),
        ).as_list())
    return layers


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's malloc_trim, or None off glibc."""
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _release_freed_host_memory() -> None:
    """glibc keeps freed heap blocks mapped; the unpacked weights we just dropped would stay in
    the process's resident memory (tens of GB for Emu on the CPU). Hand them back to the OS."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def llama_body_of(lm):
    """The LlamaModel inside a LlamaForCausalLM (or the model itself)."""
    return lm.model if hasattr(lm, "model") and hasattr(lm.model, "layers") else lm
