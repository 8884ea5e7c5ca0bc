"""What emu_fast can run, checked before anything is packed or allocated: a model it cannot run
is refused with a TypeError naming the first module at fault, never packed half-way or run
with wrong numbers.

Refused: quantized linears (bitsandbytes `Linear4bit` / `Linear8bitLt`, GPTQ / AWQ kernels:
their weights are packed integers, not the matrices our kernels read), anything that is not a
plain `torch.nn.Linear` where LLaMA has one (an unmerged LoRA wrapper, say), weights that are
not float32 / bfloat16 / float16, and (for `accelerate`, which must generate) weights that are
not there: on the meta device, as Hugging Face accelerate leaves modules it offloaded to CPU or
disk, or as a model built without weights has them.
"""
from __future__ import annotations

import torch
from torch import nn

from ..quant.modules import is_quantized
from .walk import layer_linears

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Quantized replacements of nn.Linear (bitsandbytes, auto-gptq, autoawq, optimum-quanto, hqq);
# some subclass nn.Linear, so the class is checked before isinstance.
QUANTIZED_LINEARS = {"Linear4bit", "Linear8bitLt", "LinearNF4", "LinearFP4", "QuantLinear", "WQLinear_GEMM",
                     "WQLinear_GEMV", "QLinear", "HQQLinear"}
QUANTIZED_WEIGHTS = {"Params4bit", "Int8Params", "QTensor", "QBytesTensor"}


def check_linear(module, name: str) -> torch.Tensor:
    """The weight of a bias-free float nn.Linear, or TypeError naming `name`."""
    cls = type(module).__name__
    weight = getattr(module, "weight", None)
    if cls in QUANTIZED_LINEARS or type(weight).__name__ in QUANTIZED_WEIGHTS:
        raise TypeError(f"emu_fast: {name} is a quantized {cls} ({type(module).__module__}); emu_fast runs float32, "
                        "bfloat16 or float16 weights: load the model without quantization")
    if not isinstance(module, nn.Linear):
        raise TypeError(f"emu_fast: {name} must be a torch.nn.Linear, got {cls} (an adapter such as LoRA must be "
                        "merged into the weights first)")
    if module.weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"emu_fast: {name} has {module.weight.dtype} weights; emu_fast runs torch.float32, "
                        "torch.bfloat16 or torch.float16")
    if module.bias is not None:
        raise TypeError(f"emu_fast: {name} has a bias; Emu's is bias-free and emu_fast assumes so")
    return module.weight


def check_llama_modules(lm: nn.Module) -> None:
    """Every projection of a Hugging Face LLaMA's layers is one emu_fast can pack and run as
    float weights (a missing one is a TypeError from the walker)."""
    for p in layer_linears(lm):
        check_linear(p.module, p.name)


def check_quantized_modules(lm: nn.Module) -> None:
    """Every projection of the LLaMA's layers is an emu_fast quantized linear (of one scheme:
    emu_fast.quant.apply.quantization_of), bias-free, with its buffers loaded."""
    for name, _, _, module in layer_linears(lm):
        if not is_quantized(module):
            raise TypeError(f"emu_fast: {name} is a {type(module).__name__}, not a quantized linear; the decoder's "
                            "projections must all be quantized the same way")
        if module.bias is not None:
            raise TypeError(f"emu_fast: {name} has a bias; Emu's is bias-free and emu_fast assumes so")
        if module.qweight.is_meta or module.scales.is_meta:
            raise TypeError(f"emu_fast: {name} has no data (on the meta device); load its weights first")


def check_weights_loaded(modules) -> None:
    """No weight emu_fast reads sits on the meta device. `modules`: (name, module) pairs."""
    for name, module in modules:
        for pname, p in module.named_parameters(recurse=True):
            if p.is_meta:
                offloaded = any(hasattr(m, "_hf_hook") for m in module.modules())
                why = ("offloaded to CPU or disk by Hugging Face accelerate (a device_map with 'cpu' or 'disk' "
                       "entries)" if offloaded else "the model was built on the meta device and not loaded")
                raise TypeError(f"emu_fast: {name}.{pname} has no data: {why}. emu_fast needs the language "
                                "model's weights in device memory: load it onto GPUs or the CPU without offloading")
