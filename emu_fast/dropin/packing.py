"""The one packer: a model's decoder layers as EmuDecoder takes them (LayerWeights), float or
quantized, made without keeping a second copy.

Each group of projections (q/k/v, gate/up) is copied once into one stacked tensor (the float
weights, or a quantized module's qweight and scales) and the Hugging Face modules' tensors are
re-pointed at views of it, so the original storage is freed and the model keeps working
unchanged (its forward reads the same values through the views). Packing twice is a no-op: the
second call finds the views and returns the stacked tensor they share.
"""
from __future__ import annotations

import ctypes
import functools
import platform
from typing import List, Sequence

import torch
from torch import nn

from ..layer_weights import LayerWeights
from .model_checks import check_llama_modules, check_quantized_modules
from .walk import llama_body_of

def _stacked_base(modules: Sequence[nn.Module], name: str):
    """The stacked tensor these modules' `name` tensors are consecutive views of, or None."""
    base = getattr(modules[0], "_emu_fast_packed", {}).get(name)
    if base is None:
        return None
    row = 0
    for m in modules:
        t = getattr(m, name)
        view = base[row : row + t.shape[0]]
        if t.data_ptr() != view.data_ptr() or t.shape != view.shape or not t.is_contiguous():
            return None
        row += t.shape[0]
    return base if row == base.shape[0] else None


@torch.no_grad()
def stack_(modules: Sequence[nn.Module], name: str) -> torch.Tensor:
    """Stack the modules' `name` tensors (a Linear's "weight", a quantized linear's "qweight" or
    "scales") on dim 0 into one tensor and re-point each module's tensor at its rows: one copy,
    the old storage freed, the modules' forward unchanged. Returns the stacked tensor."""
    base = _stacked_base(modules, name)
    if base is not None:
        return base
    ts = [getattr(m, name) for m in modules]
    if any(t.shape[1:] != ts[0].shape[1:] or t.dtype != ts[0].dtype or t.device != ts[0].device for t in ts):
        raise ValueError(f"emu_fast: the {name} tensors to stack differ in width, dtype or device: "
                         f"{[(tuple(t.shape), t.dtype, str(t.device)) for t in ts]}")
    base = torch.empty((sum(t.shape[0] for t in ts),) + tuple(ts[0].shape[1:]), dtype=ts[0].dtype,
                       device=ts[0].device)
    row = 0
    for m, t in zip(modules, ts):
        n = t.shape[0]
        base[row : row + n].copy_(t)
        if name in m._parameters:
            t.data = base[row : row + n]  # the module keeps its Parameter; the old storage is released
        else:
            setattr(m, name, base[row : row + n])  # a buffer
        row += n
    modules[0]._emu_fast_packed = {**getattr(modules[0], "_emu_fast_packed", {}), name: base}
    if base.device.type == "cpu":  # so the peak stays at the weights plus one stacked buffer
        _release_freed_host_memory()
    return base


@torch.no_grad()
def pack_layers(lm, quantized: bool = False) -> List[List[torch.Tensor]]:
    """Per decoder layer of a Hugging Face LLaMA, its LayerWeights as the EmuDecoder binding's
    list: [input_norm, qkv, o, post_norm, gate_up, down], plus the four scales when `quantized`
    (projections that are emu_fast.quant modules). Stacks q/k/v and gate/up in place. Every
    layer is checked before the first is packed (model_checks: for float weights, quantized or
    non-Linear projections and non-float weights; for quantized ones, anything else)."""
    (check_quantized_modules if quantized else check_llama_modules)(lm)
    tensors = ("qweight", "scales") if quantized else ("weight",)
    layers = []
    for layer in llama_body_of(lm).layers:
        attn, mlp = layer.self_attn, layer.mlp
        groups = {"qkv": [attn.q_proj, attn.k_proj, attn.v_proj], "o": [attn.o_proj],
                  "gate_up": [mlp.gate_proj, mlp.up_proj], "down": [mlp.down_proj]}
        parts = {}
        for key, modules in groups.items():
            for name in tensors:
                field = key if name != "scales" else f"{key}_scales"
                parts[field] = stack_(modules, name) if len(modules) > 1 else getattr(modules[0], name).detach()
        layers.append(LayerWeights(input_norm=layer.input_layernorm.weight.detach(),
                                   post_norm=layer.post_attention_layernorm.weight.detach(), **parts).as_list())
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
