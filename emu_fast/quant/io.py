"""Saving and loading a quantized Emu language model with safetensors, so a service quantizes once.

    quantize_decoder_linears_(model, weights="int4")
    save_quantized(model, "emu2-int4.safetensors")
    ...
    model = build_the_model_without_weights_or_with_any()     # same config
    load_quantized(model, "emu2-int4.safetensors")            # quantized modules, loaded weights

What is saved: the whole state dict of the model's Hugging Face LLaMA (`model.decoder.lm` of an
Emu1/Emu2 model, which carries the regression head and Emu2's project_up/project_down; or the
LLaMA itself): the quantized projections' `qweight` / `scales` (and biases), and everything else
in the model's dtype. The safetensors metadata says the format and its version, the scheme, the
group size, the family and the language model's shape (`config`), and the quantized modules.
Modules outside the LLaMA (an Emu2 whose project_up sits on the model itself, the vision
parts) are not in the file: they come from however the model is built.

Loading checks the file before it changes the model: a file that is not safetensors (corrupt,
truncated), not ours, of another version, or whose config, scheme, keys, shapes or dtypes do not
match the model raises ValueError naming what differs; so do damaged metadata (a config that is
not a JSON object, a bad int4 group_size) and scales that are NaN, inf, negative or subnormal
(emu_fast.quant.schemes writes 0 for an all-zero row or group, else a normal positive float32).
Then the model's decoder linears are replaced by empty quantized modules (if not quantized yet) and every tensor is copied in.
"""
from __future__ import annotations

import json
import os
from typing import Dict, NamedTuple, Union

import torch
from torch import nn

from ..dropin.families import family_of, is_emu_like
from ..dropin.walk import layer_linears, llama_of
from .apply import quantization_of, replace_with_empty_
from .modules import QUANTIZED_MODULES
from .schemes import MIN_SCALE, REGISTRY, SCHEMES

FORMAT = "emu_fast.quantized"
VERSION = "1"
CONFIG_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads")


class QuantizedState(NamedTuple):
    """What save_quantized writes: the tensors and the (string) safetensors metadata."""
    tensors: Dict[str, torch.Tensor]
    metadata: Dict[str, str]


def _config_of(lm: nn.Module) -> Dict[str, object]:
    config = getattr(lm, "config", None)
    return {f: getattr(config, f, None) for f in CONFIG_FIELDS}


def _family_name(model) -> str:
    if is_emu_like(model):
        return family_of(model).name
    return "llama"


def quantized_state_dict(model) -> QuantizedState:
    """The tensors and metadata save_quantized writes for a model quantized by
    quantize_decoder_linears_ (ValueError for one that is not)."""
    quantization = quantization_of(model)
    if quantization is None:
        raise ValueError("emu_fast.save_quantized: the model is not quantized; call "
                         "emu_fast.quant.apply.quantize_decoder_linears_(model, weights=...) first")
    scheme, group_size = quantization
    lm = llama_of(model)
    tensors, seen = {}, set()
    for name, t in lm.state_dict().items():
        t = t.detach()
        if t.is_meta:
            raise ValueError(f"emu_fast.save_quantized: {name} is on the meta device (not loaded)")
        # safetensors refuses tensors sharing memory (tied embeddings): such a second name gets a copy.
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else None
        # A view into a larger tensor (the q/k/v and gate/up buffers emu_fast.accelerate stacks)
        # gets a copy of its own rows too.
        partial = t.numel() and t.untyped_storage().nbytes() != t.numel() * t.element_size()
        tensors[name] = t.contiguous() if key not in seen and not partial else t.clone()
        if key is not None:
            seen.add(key)
    modules = [{"name": name, "in_features": m.in_features, "out_features": m.out_features,
                "bias": m.bias is not None} for name, _, _, m in layer_linears(model)]
    metadata = {"format": FORMAT, "version": VERSION, "scheme": scheme,
                "group_size": str(group_size if group_size is not None else 0), "family": _family_name(model),
                "config": json.dumps(_config_of(lm)), "modules": json.dumps(modules)}
    return QuantizedState(tensors, metadata)


def save_quantized(model_or_state: Union[nn.Module, QuantizedState], path: Union[str, os.PathLike]) -> None:
    """Write a quantized model (or a QuantizedState from quantized_state_dict) to `path`."""
    from safetensors.torch import save_file

    state = model_or_state if isinstance(model_or_state, QuantizedState) else quantized_state_dict(model_or_state)
    if state.metadata.get("format") != FORMAT or state.metadata.get("scheme") not in SCHEMES:
        raise ValueError("emu_fast.save_quantized: the state's metadata is not emu_fast's (use quantized_state_dict)")
    save_file({k: v.cpu() for k, v in state.tensors.items()}, os.fspath(path), metadata=state.metadata)


def _fail(path, message: str):
    raise ValueError(f"emu_fast.load_quantized: {os.fspath(path)}: {message}")


def _read_metadata(f, path) -> Dict[str, object]:
    return parse_metadata(f.metadata() or {}, path)


def parse_metadata(meta: Dict[str, str], path, fail=_fail) -> Dict[str, object]:
    """The scheme, group size, config and family of an emu_fast file's safetensors metadata,
    checked; `fail(path, message)` raises (load_quantized's ValueError by default)."""
    if meta.get("format") != FORMAT:
        fail(path, "not an emu_fast quantized checkpoint (no emu_fast metadata; write one with save_quantized)")
    if meta.get("version") != VERSION:
        fail(path, f"format version {meta.get('version')!r}; this emu_fast reads version {VERSION}")
    try:
        parsed = {"scheme": meta["scheme"], "group_size": int(meta["group_size"]),
                  "config": json.loads(meta["config"]), "family": meta["family"]}
    except (KeyError, ValueError) as e:
        fail(path, f"damaged metadata ({type(e).__name__}: {e})")
    if not isinstance(parsed["config"], dict):
        fail(path, f"damaged metadata (config is {type(parsed['config']).__name__} {meta['config']!r}, "
                   "not a JSON object)")
    if parsed["scheme"] not in SCHEMES:
        fail(path, f"unknown weight scheme {parsed['scheme']!r}; known: {', '.join(SCHEMES)}")
    try:
        REGISTRY[parsed["scheme"]].group(parsed["group_size"], "load_quantized")
    except ValueError as e:
        fail(path, f"damaged metadata ({e})")
    return parsed


def _check_scales(f, path, keys) -> None:
    """Every quantized module's scales are 0 (an all-zero row or group) or a normal positive
    float32, as emu_fast.quant.schemes writes them; NaN, inf, negative or subnormal ones would give
    garbage outputs without a word, so the file is refused naming the tensor."""
    for k in keys:
        s = f.get_tensor(k)
        bad = ~(torch.isfinite(s) & ((s == 0) | (s >= MIN_SCALE)))
        if bool(bad.any()):
            i = tuple(int(j) for j in bad.nonzero()[0])
            _fail(path, f"{k} holds {int(bad.sum())} scales that are NaN, inf, negative or subnormal (first "
                        f"{float(s[i])!r} at {list(i)}); scales are 0 (an all-zero row or group) or at least "
                        f"{MIN_SCALE!r}")


@torch.no_grad()
def load_quantized(model, path: Union[str, os.PathLike]):
    """Load a file written by save_quantized into `model` (same family and config; quantized the
    same way, or not quantized yet: its decoder linears are then replaced by empty quantized
    modules, releasing their float weights). Returns the model. A model whose parameters are on
    the meta device (built under accelerate.init_empty_weights()) gets CPU tensors from the file."""
    from safetensors import SafetensorError, safe_open

    lm = llama_of(model)
    persistent = set(lm.state_dict().keys())
    unloadable = [n for n, b in lm.named_buffers() if b.is_meta and n not in persistent]
    if unloadable:  # not in any file: the model must build them (accelerate's init_empty_weights does)
        raise ValueError(f"emu_fast.load_quantized: the model's buffers {unloadable[:3]} are on the meta device and "
                         "are not saved in files; build the model with its buffers (e.g. under "
                         "accelerate.init_empty_weights(), which leaves only the parameters empty)")
    try:
        handle = safe_open(os.fspath(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        _fail(path, f"not a readable safetensors file ({type(e).__name__}: {e})")
    with handle as f:
        return _load(model, lm, f, path)


def _load(model, lm, f, path):
    meta = _read_metadata(f, path)
    if meta["family"] != _family_name(model):
        _fail(path, f"holds an {meta['family']} model; this is an {_family_name(model)} model")
    ours = _config_of(lm)
    differ = [f"{k}: file {meta['config'].get(k)!r}, model {v!r}" for k, v in ours.items() if meta["config"].get(k) != v]
    if differ:
        _fail(path, "its config does not match the model's (" + "; ".join(differ) + ")")
    scheme = REGISTRY[meta["scheme"]]
    group_size = scheme.group(meta["group_size"], "load_quantized")
    wanted = (scheme.name, group_size)
    current = quantization_of(model)
    if current is not None and current != wanted:
        _fail(path, f"holds {scheme.name} weights{scheme.group_note(group_size)} but the model is already quantized "
                    f"as {current[0]}{REGISTRY[current[0]].group_note(current[1])}")

    # Every check that needs only the file's header and the model's shapes, before any change.
    expected = {k: (tuple(v.shape), v.dtype) for k, v in _shapes_after_quantization(model, lm, current, wanted)}
    keys = set(f.keys())
    missing, unexpected = sorted(set(expected) - keys), sorted(keys - set(expected))
    if missing or unexpected:
        _fail(path, f"its tensors do not match the model's: missing {missing[:5]}{' ...' if len(missing) > 5 else ''}"
                    f", unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    for k, (shape, dtype) in expected.items():
        sl = f.get_slice(k)
        file_shape, file_dtype = tuple(sl.get_shape()), sl.get_dtype()
        if file_shape != shape or SAFETENSORS_DTYPES.get(file_dtype) != dtype:
            _fail(path, f"{k} is {file_dtype} {list(file_shape)} in the file but {dtype} {list(shape)} in the model")

    quantized = {name for name, _, _, _ in layer_linears(model)}
    _check_scales(f, path, sorted(k for k in keys if k.endswith(".scales") and k.rsplit(".", 1)[0] in quantized))

    if current is None:
        replace_with_empty_(model, scheme.name, group_size)
    state = lm.state_dict()
    if any(t.is_meta for t in state.values()):
        lm.load_state_dict({k: f.get_tensor(k) for k in keys}, strict=True, assign=True)
    else:
        for k in keys:
            state[k].copy_(f.get_tensor(k))
    return model


SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
           "BOOL": torch.bool}


def _shapes_after_quantization(model, lm, current, wanted):
    """(name, tensor-like with .shape/.dtype) of the LLaMA's state dict as it will be once its
    decoder linears are quantized as `wanted`, computed without changing the model."""
    if current is not None:
        return [(k, v) for k, v in lm.state_dict().items()]
    scheme, group_size = wanted
    cls = QUANTIZED_MODULES[scheme]
    replaced = {}
    for name, _, _, module in layer_linears(model):
        q = cls(module.in_features, module.out_features, module.bias is not None,
                dtype=module.weight.dtype, device="meta", group_size=group_size)
        for k, v in q.state_dict().items():
            replaced[f"{name}.{k}"] = v
    quantized = {name for name, _, _, _ in layer_linears(model)}
    out = [(k, v) for k, v in lm.state_dict().items() if k.rsplit(".", 1)[0] not in quantized]
    return out + list(replaced.items())
