"""Weight-only quantized replacements of nn.Linear, and quantizing an Emu model's decoder body.

    from emu_fast.quantized_linear import quantize_decoder_linears_
    quantize_decoder_linears_(model, weights="int8")      # or "int4" (group_size=128)
    model.generate_image([...])                           # the model's own forward runs on them

`Int8Linear` / `Int4Linear` hold `qweight` / `scales` buffers (the schemes of emu_fast.quantize)
and an optional bias in the model's dtype; `forward` runs torch.ops.emu_fast.gemv_int8 /
gemv_int4 and `dequantize()` gives the weight they compute with.

Only the decoder body's projections are quantized (q/k/v/o_proj, gate/up/down_proj of each
LLaMA layer). Embeddings, norms, lm_head, the regression head and Emu2's project_up /
project_down keep the model's dtype.

`emu_fast.accelerate(model, weights="int8" | "int4")` quantizes with quantize_decoder_linears_
and runs the decoder on these modules' buffers (pack_quantized_layers stacks q/k/v and gate/up
in place, as emu_fast.packing does for float weights); a model quantized here, or loaded with
emu_fast.quantized_io.load_quantized, is accelerated as it is.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import ops  # noqa: F401  (registers torch.ops.emu_fast.*)
from .families import family_of, is_emu_like
from .layer_weights import LayerWeights
from .model_checks import LAYER_LINEARS, check_weights_loaded
from .packing import llama_body_of
from .quantize import (DEFAULT_GROUP_SIZE, check_group_size, check_scheme, dequantize_int4, dequantize_int8,
                       int4_groups, int4_row_bytes, quantize_int4, quantize_int8)

# Rows (tokens) up to which forward runs our GEMV op: it reads the weight once for the whole
# batch, which is what decode steps and short prompts need. Past it (a long prefill), forward
# dequantizes the weight for the call and uses F.linear (a matrix multiply), which is faster
# there; the temporary weight is one projection's, freed on return.
GEMV_MAX_ROWS = 32
# Activations the ops take; others (float16) take the dequantize + F.linear path, as do devices
# the ops have no kernel for (CUDA in a build without it).
_OP_DTYPES = (torch.float32, torch.bfloat16)


def _op_runs_on(device: torch.device) -> bool:
    return device.type == "cpu" or (device.type == "cuda" and _cuda_ops_built())


@functools.lru_cache(maxsize=None)
def _cuda_ops_built() -> bool:
    """Whether this build registered the quantized ops' CUDA kernels (asked once, not per forward)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("emu_fast::gemv_int8", "CUDA")


class _QuantizedLinear(nn.Module):
    """What Int8Linear and Int4Linear share: shapes, bias, the forward's choice of path."""

    scheme: str

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype, device):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.dtype = dtype  # the model's dtype: of the bias, and what dequantize() returns by default
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None

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

    def _gemv(self, x2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        # The op has no backward: an input that needs a gradient takes the differentiable path.
        needs_grad = torch.is_grad_enabled() and x2.requires_grad
        if x2.shape[0] <= GEMV_MAX_ROWS and x2.dtype in _OP_DTYPES and x2.device == self.scales.device \
                and _op_runs_on(x2.device) and not needs_grad:
            y = self._gemv(x2)
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
                f"bias={self.bias is not None}, dtype={self.dtype}")


class Int8Linear(_QuantizedLinear):
    """nn.Linear with int8 weights, symmetric per output channel (emu_fast.quantize):
    qweight int8 [out, in], scales float32 [out]."""

    scheme = "int8"

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype=torch.float32, device=None):
        super().__init__(in_features, out_features, bias, dtype, device)
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.zeros(out_features, dtype=torch.float32, device=device))

    def _set_weight(self, w: torch.Tensor, device=None) -> None:
        self.qweight, self.scales = quantize_int8(w, device=device)

    def _gemv(self, x2):
        return ops.gemv_int8(x2, self.qweight, self.scales)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The weight forward computes with ([out, in], float32 inside), in `dtype` (default the
        model's: float32 gives it exactly)."""
        return dequantize_int8(self.qweight, self.scales, dtype or self.dtype)


class Int4Linear(_QuantizedLinear):
    """nn.Linear with int4 weights, symmetric in groups of `group_size` inputs (emu_fast.quantize):
    qweight uint8 [out, ceil(in/32)*16] (two values a byte), scales float32 [out, ceil(in/group)]."""

    scheme = "int4"

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype=torch.float32, device=None,
                 group_size: int = DEFAULT_GROUP_SIZE):
        super().__init__(in_features, out_features, bias, dtype, device)
        self.group_size = check_group_size(group_size, "Int4Linear")
        self.register_buffer("qweight", torch.full((out_features, int4_row_bytes(in_features)), 0x88,
                                                   dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.zeros(out_features, int4_groups(in_features, group_size),
                                                   dtype=torch.float32, device=device))

    def _set_weight(self, w: torch.Tensor, device=None) -> None:
        self.qweight, self.scales = quantize_int4(w, self.group_size, device=device)

    def _gemv(self, x2):
        return ops.gemv_int4(x2, self.qweight, self.scales, self.group_size)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The weight forward computes with ([out, in], float32 inside), in `dtype` (default the
        model's: float32 gives it exactly)."""
        return dequantize_int4(self.qweight, self.scales, self.in_features, self.group_size, dtype or self.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"


QUANTIZED_MODULES = {"int8": Int8Linear, "int4": Int4Linear}


def is_quantized(module) -> bool:
    return isinstance(module, _QuantizedLinear)


def llama_of(model) -> nn.Module:
    """The Hugging Face LLaMA (LlamaForCausalLM or LlamaModel) inside an Emu1/Emu2 model, or
    the model itself when it is one."""
    if is_emu_like(model):
        family = family_of(model)  # TypeError saying what is missing, for an Emu-like model that is not one
        return family.lm(model)
    if hasattr(llama_body_of(model), "layers"):
        return model
    raise TypeError(f"emu_fast: {type(model).__name__} is neither an Emu model nor a Hugging Face LLaMA")


def decoder_linears(model):
    """(name, parent module, attribute, module) of each projection of each decoder layer, named
    as in the LLaMA's state dict ("model.layers.0.self_attn.q_proj"), layer by layer."""
    body = llama_body_of(llama_of(model))
    prefix = "model." if body is not llama_of(model) else ""
    for i, layer in enumerate(body.layers):
        for path in LAYER_LINEARS:
            parent_path, attr = path.rsplit(".", 1)
            parent = getattr(layer, parent_path, None)
            module = getattr(parent, attr, None) if parent is not None else None
            if module is None:
                raise TypeError(f"emu_fast: {prefix}layers.{i}.{path} is missing; not a Hugging Face LLaMA layer")
            yield f"{prefix}layers.{i}.{path}", parent, attr, module


def quantization_of(model):
    """(scheme, group_size) of a model whose decoder linears are all quantized, None when none
    is; ValueError when they are mixed."""
    found = {(m.scheme, getattr(m, "group_size", None)) if is_quantized(m) else None
             for _, _, _, m in decoder_linears(model)}
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
    check_scheme(weights, "quantize_decoder_linears_")
    if weights == "int4":
        check_group_size(group_size, "quantize_decoder_linears_")
    device = resolve_device(device, "quantize_decoder_linears_")
    linears = list(decoder_linears(model))
    for name, _, _, module in linears:
        if is_quantized(module):
            raise ValueError(f"emu_fast.quantize_decoder_linears_: the model is already quantized ({name} is a "
                             f"{type(module).__name__}); quantize the unquantized model once")
        if not isinstance(module, nn.Linear):
            raise TypeError(f"emu_fast: {name} must be a torch.nn.Linear to be quantized, got {type(module).__name__}")
        if not module.weight.is_floating_point():
            raise TypeError(f"emu_fast: {name} has {module.weight.dtype} weights; expected a float dtype")
    check_weights_loaded([(name, module) for name, _, _, module in linears])
    cls = QUANTIZED_MODULES[weights]
    kw = {"group_size": group_size} if weights == "int4" else {}
    per_layer = len(LAYER_LINEARS)
    for i, layer in enumerate(llama_body_of(llama_of(model)).layers):
        for name, parent, attr, module in linears[i * per_layer:(i + 1) * per_layer]:
            setattr(parent, attr, cls.from_linear(module, device=device, **kw))
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
    anything (their buffers to be loaded: emu_fast.quantized_io.load_quantized). Float weights
    are released as in quantize_decoder_linears_."""
    check_scheme(weights, "load_quantized")
    cls = QUANTIZED_MODULES[weights]
    kw = {"group_size": group_size} if weights == "int4" else {}
    for name, parent, attr, module in list(decoder_linears(model)):
        device = module.weight.device
        dtype = module.weight.dtype
        new = cls(module.in_features, module.out_features, module.bias is not None, dtype=dtype,
                  device="cpu" if device.type == "meta" else device, **kw)
        setattr(parent, attr, new)
        module.weight = None
    return model


# ------------------------------------------------------------------------------ for EmuDecoder

BITS = {"int8": 8, "int4": 4}


def prepare_quantization(model, weights: Optional[str], group_size: Optional[int], fn: str = "accelerate",
                         apply: bool = True, device: Optional[torch.device] = None):
    """The decoder's scheme, (scheme, group_size or None), or None for float weights.

    weights None: the model's own (a model quantized by quantize_decoder_linears_ or loaded with
    load_quantized runs as it is; an unquantized one stays so). weights "int8" / "int4": the
    model's decoder linears are quantized now (group_size: int4's group, default 128), unless
    they already are, in which case the scheme (and a group_size given) must match. ValueError
    naming an unknown scheme or a mismatch, before anything changes; apply=False only checks.
    device: where quantize_decoder_linears_ puts the quantized layers (None: where they are)."""
    if weights is not None:
        check_scheme(weights, fn)
    if group_size is not None:
        if weights == "int8":
            raise ValueError(f"emu_fast.{fn}: group_size is for int4 weights; int8 has one scale per output row")
        check_group_size(group_size, fn)
    current = quantization_of(model)
    if current is not None:
        scheme, group = current
        if (weights is not None and weights != scheme) or (group_size is not None and group_size != group):
            raise ValueError(f"emu_fast.{fn}: the model is already quantized as {scheme}"
                             f"{f' (group_size {group})' if group else ''}; asked for {weights or scheme}"
                             f"{f' (group_size {group_size})' if group_size else ''}. Pass weights=None to run it "
                             "as it is, or start from the unquantized model")
        return current
    if weights is None:
        return None
    group = (group_size or DEFAULT_GROUP_SIZE) if weights == "int4" else None
    if apply:
        quantize_decoder_linears_(model, weights, group or DEFAULT_GROUP_SIZE, device=device)
    return weights, group


@torch.no_grad()
def _pack_buffers(modules, name: str) -> torch.Tensor:
    """Stack the modules' `name` buffers (qweight or scales) on dim 0 into one tensor and re-point
    each module's buffer at its rows: one copy, the old buffers freed, the modules' forward
    unchanged. Packing again returns the same tensor while the views are still in place."""
    attr = f"_emu_fast_packed_{name}"
    base = getattr(modules[0], attr, None)
    if base is not None:
        row = 0
        for m in modules:
            t = getattr(m, name)
            if t.data_ptr() != base[row:].data_ptr() or t.shape[1:] != base.shape[1:]:
                break
            row += t.shape[0]
        else:
            if row == base.shape[0]:
                return base
    ts = [getattr(m, name) for m in modules]
    if any(t.shape[1:] != ts[0].shape[1:] or t.dtype != ts[0].dtype or t.device != ts[0].device for t in ts):
        raise ValueError(f"emu_fast: the {name} buffers to stack differ in width, dtype or device: "
                         f"{[(tuple(t.shape), t.dtype, str(t.device)) for t in ts]}")
    base = torch.cat(ts, 0)
    row = 0
    for m, t in zip(modules, ts):
        setattr(m, name, base[row:row + t.shape[0]])
        row += t.shape[0]
    setattr(modules[0], attr, base)
    return base


@torch.no_grad()
def pack_quantized_layers(lm):
    """Per decoder layer of a Hugging Face LLaMA whose projections are Int8Linear / Int4Linear,
    what EmuDecoder takes with weight_bits 8 / 4: [input_norm, qkv qweight, o qweight, post_norm,
    gate_up qweight, down qweight, qkv scales, o scales, gate_up scales, down scales]. Stacks
    q/k/v's and gate/up's qweights and scales in place (their modules keep working on views)."""
    for name, _, _, module in decoder_linears(lm):
        if not is_quantized(module):
            raise TypeError(f"emu_fast: {name} is a {type(module).__name__}, not a quantized linear; the decoder's "
                            "projections must all be quantized the same way")
        if module.bias is not None:
            raise TypeError(f"emu_fast: {name} has a bias; Emu's is bias-free and emu_fast assumes so")
        if module.qweight.is_meta or module.scales.is_meta:
            raise TypeError(f"emu_fast: {name} has no data (on the meta device); load its weights first")
    layers = []
    for layer in llama_body_of(lm).layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv, gate_up = [attn.q_proj, attn.k_proj, attn.v_proj], [mlp.gate_proj, mlp.up_proj]
        layers.append(LayerWeights(
            input_norm=layer.input_layernorm.weight.detach(), qkv=_pack_buffers(qkv, "qweight"), o=attn.o_proj.qweight,
            post_norm=layer.post_attention_layernorm.weight.detach(), gate_up=_pack_buffers(gate_up, "qweight"),
            down=mlp.down_proj.qweight, qkv_scales=_pack_buffers(qkv, "scales"), o_scales=attn.o_proj.scales,
            gate_up_scales=_pack_buffers(gate_up, "scales"), down_scales=mlp.down_proj.scales).as_list())
    return layers


def quantized_buffers(lm):
    """The qweight / scales tensors of the LLaMA's quantized projections (none when unquantized)."""
    return [t for _, _, _, m in decoder_linears(lm) if is_quantized(m) for t in (m.qweight, m.scales)]
