"""Weight-only quantized replacements of nn.Linear: one module class per registered scheme.

`Int8Linear` / `Int4Linear` hold `qweight` / `scales` buffers (the schemes of
emu_fast.quant.schemes) and an optional bias in the model's dtype; `forward` runs the scheme's
op (torch.ops.emu_fast.gemv_int8 / gemv_int4) and `dequantize()` gives the weight it computes
with. Everything scheme-specific is asked of the module's `scheme` (a QuantScheme).

Putting them into a model: emu_fast.quant.apply (quantize_decoder_linears_); saving and
loading them: emu_fast.quant.io.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops  # noqa: F401  (registers torch.ops.emu_fast.*)
from .schemes import DEFAULT_GROUP_SIZE, INT4, INT8, QuantScheme

# Rows (tokens) up to which forward runs our GEMV op: it reads the weight once for the whole
# batch, which is what decode steps and short prompts need. Past it (a long prefill), forward
# dequantizes the weight for the call and uses F.linear (a matrix multiply), which is faster
# there; the temporary weight is one projection's, freed on return.
GEMV_MAX_ROWS = 32
# Activations the ops take; others (float16) take the dequantize + F.linear path, as do devices
# the ops have no kernel for (CUDA in a build without it).
_OP_DTYPES = (torch.float32, torch.bfloat16)


def _op_runs_on(op: str, device: torch.device) -> bool:
    return device.type == "cpu" or (device.type == "cuda" and _cuda_op_built(op))


@functools.lru_cache(maxsize=None)
def _cuda_op_built(op: str) -> bool:
    """Whether this build registered the op's CUDA kernel (asked once, not per forward)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"emu_fast::{op}", "CUDA")


class _QuantizedLinear(nn.Module):
    """A quantized nn.Linear of the class's `scheme`: qweight / scales buffers of the scheme's
    shapes (zeros until loaded or set), the bias, the forward's choice of path. group_size: the
    scheme's group (grouped schemes only; None otherwise)."""

    scheme: QuantScheme

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype=torch.float32, device=None,
                 group_size: int = DEFAULT_GROUP_SIZE):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.dtype = dtype  # the model's dtype: of the bias, and what dequantize() returns by default
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None
        s = self.scheme
        self.group_size = s.group(group_size, type(self).__name__)
        self.register_buffer("qweight", torch.full(s.qweight_shape(out_features, in_features), s.empty_code,
                                                   dtype=s.qweight_dtype, device=device))
        self.register_buffer("scales", torch.zeros(s.scales_shape(out_features, in_features, self.group_size),
                                                   dtype=torch.float32, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, device=None, **kw) -> "_QuantizedLinear":
        """A quantized copy of `linear` on `device` (default: its own; the float weight goes
        there a chunk of rows at a time); `linear` itself is left as it is."""
        w = linear.weight.detach()
        # Built on the meta device (nothing allocated), then given the quantized buffers.
        module = cls(linear.in_features, linear.out_features, False, dtype=w.dtype, device="meta", **kw)
        module._set_weight(w, device)
        if linear.bias is not None:
            bias = linear.bias.detach().to(device=device or w.device, dtype=w.dtype, copy=True)
            module.bias = nn.Parameter(bias, requires_grad=False)
        return module

    def _set_weight(self, w: torch.Tensor, device=None) -> None:
        self.qweight, self.scales = self.scheme.quantize(w, self.group_size, device=device)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The weight forward computes with ([out, in], float32 inside), in `dtype` (default the
        model's: float32 gives it exactly)."""
        return self.scheme.dequantize(self.qweight, self.scales, self.in_features, self.group_size,
                                      dtype or self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        # The op has no backward: an input that needs a gradient takes the differentiable path.
        needs_grad = torch.is_grad_enabled() and x2.requires_grad
        if x2.shape[0] <= GEMV_MAX_ROWS and x2.dtype in _OP_DTYPES and x2.device == self.scales.device \
                and _op_runs_on(self.scheme.op, x2.device) and not needs_grad:
            y = self.scheme.gemv(x2, self.qweight, self.scales, self.group_size)
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
        else:  # long inputs, other dtypes or devices, autograd: see GEMV_MAX_ROWS
            y = F.linear(x2, self.dequantize(x2.dtype), None if self.bias is None else self.bias.to(x2.dtype))
        return y.reshape(*lead, self.out_features)

    def _apply(self, fn, recurse=True):
        """.to(dtype) / .half() / .bfloat16() cast every float buffer: the scheme's scales stay
        float32 (taken from before the cast, so nothing is rounded), qweight is integer, and the
        module's dtype (bias, dequantize()'s default) follows the cast."""
        scales = self.scales
        super()._apply(fn, recurse)
        self.dtype = fn(torch.empty(0, dtype=self.dtype, device=scales.device)).dtype
        if self.scales.dtype != torch.float32:
            self.scales = scales.to(device=self.scales.device, dtype=torch.float32)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, dtype={self.dtype}"
                + (f", group_size={self.group_size}" if self.group_size is not None else ""))


class Int8Linear(_QuantizedLinear):
    """nn.Linear with int8 weights, symmetric per output channel (emu_fast.quant.schemes):
    qweight int8 [out, in], scales float32 [out]."""

    scheme = INT8


class Int4Linear(_QuantizedLinear):
    """nn.Linear with int4 weights, symmetric in groups of `group_size` inputs (emu_fast.quant.schemes):
    qweight uint8 [out, ceil(in/32)*16] (two values a byte), scales float32 [out, ceil(in/group)]."""

    scheme = INT4


# The module class of each registered scheme.
QUANTIZED_MODULES = {cls.scheme.name: cls for cls in (Int8Linear, Int4Linear)}


def is_quantized(module) -> bool:
    return isinstance(module, _QuantizedLinear)
