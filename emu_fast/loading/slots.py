"""The plan of a load: the decoder's tensors allocated on the device and filled in place as each
checkpoint tensor arrives (Slots), every tensor's expected shape checked before any data is
read (check_shape), and what a load keeps on the device (estimate_bytes)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ..config import LlamaShape, check_llama_config
from ..layer_weights import LayerWeights
from ..quant.schemes import MIN_SCALE, REGISTRY, scheme_named
from .checkpoint import NORMS, PROJECTIONS, Checkpoint, CheckpointError, _fail


def shape_of(cfg: dict, where: Path) -> LlamaShape:
    """The LLaMA shape of a config dict (config.LlamaShape, as from_llama reads a model's), with
    the checks a model's config gets; a missing or bad field is a CheckpointError."""
    from types import SimpleNamespace

    fields = SimpleNamespace(**{"rms_norm_eps": 1e-6, **{k: v for k, v in cfg.items() if isinstance(k, str)}})
    try:
        shape = LlamaShape.from_hf(fields)
        shape = LlamaShape(*(int(getattr(shape, f)) for f in ("hidden", "layers", "heads", "kv_heads",
                                                              "intermediate")),
                           eps=float(shape.eps), rope_theta=float(shape.rope_theta))
    except (AttributeError, TypeError, ValueError) as e:
        _fail(where, f"its config lacks a LLaMA field or has a bad one ({type(e).__name__}: {e})")
    check_llama_config(fields)
    if shape.hidden % shape.heads or shape.heads % shape.kv_heads:
        _fail(where, f"its config's {shape.heads} heads / {shape.kv_heads} KV heads do not divide hidden "
                     f"{shape.hidden}")
    return shape


class Slots:
    """The decoder's tensors, allocated on the device as their first part arrives, filled in
    place: per layer the two norms and four (stacked) projections, float or quantized."""

    def __init__(self, shape: LlamaShape, dtype, device, scheme: Optional[str], group_size: Optional[int],
                 tp=None):
        self.shape, self.dtype, self.device, self.scheme, self.group = shape, dtype, device, scheme, group_size
        s = shape
        kv = s.kv_heads * s.head_dim
        # rows of each part of each stacked projection, and its input size (the checkpoint's)
        self.parts = {"qkv": ([s.hidden, kv, kv], s.hidden), "o": ([s.hidden], s.hidden),
                      "gate_up": ([s.intermediate, s.intermediate], s.hidden), "down": ([s.hidden], s.intermediate)}
        # A tensor-parallel rank (emu_fast.parallel) keeps its share: its rows of each part of the
        # stacks cut by rows, its inputs of those cut by columns.
        self.rank, self.ranks = (0, 1) if tp is None else (tp.rank, tp.size)
        self.layers: List[Dict[str, torch.Tensor]] = [{} for _ in range(s.layers)]

    def expected(self, has_up: bool) -> set:
        names = {"embed", "norm", "head"} | ({"up"} if has_up else set())
        for i in range(self.shape.layers):
            names |= {f"layers.{i}.{n}.weight" for n in NORMS}
            names |= {f"layers.{i}.{p}.weight" for p in PROJECTIONS}
        return names

    def projection_shape(self, param: str) -> Tuple[int, int]:
        stack, part = PROJECTIONS[param]
        rows, k = self.parts[stack]
        return rows[part], k

    def _buffer(self, i: int, key: str, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        layer = self.layers[i]
        if key not in layer:
            layer[key] = make()
        return layer[key]

    def _share(self, stack: str, part: int):
        """This rank's slot of a part: (rows of each part of the stack, input size, the part's
        row range in the stack, its share of the checkpoint's rows or None, its input columns
        [k0, k1) or None)."""
        rows, k = self.parts[stack]
        n, r = self.ranks, self.rank
        columns = stack in ("o", "down")  # cut by inputs; the other stacks by rows
        if n > 1 and columns:
            k0, k1 = r * k // n, (r + 1) * k // n
            return rows, k1 - k0, (0, rows[0]), None, (k0, k1)
        rows = [x // n for x in rows]
        r0, r1 = sum(rows[:part]), sum(rows[:part + 1])
        mine = None if n == 1 else (r * rows[part], (r + 1) * rows[part])
        return rows, k, (r0, r1), mine, None

    def needed(self, param: str, t: torch.Tensor) -> torch.Tensor:
        """Of a float projection as the checkpoint holds it, what this rank reads (a view, before
        any conversion or copy): its rows, and for o / down its input columns, except where they
        are quantized here (a row's int8 scale spans all its columns: quantized whole, then cut)."""
        stack, part = PROJECTIONS[param]
        _, _, _, mine, cols = self._share(stack, part)
        if mine is not None:
            t = t[mine[0]:mine[1]]
        if cols is not None and self.scheme is None:
            t = t[:, cols[0]:cols[1]]
        return t

    def put_projection(self, i: int, param: str, w: torch.Tensor) -> None:
        """A float projection into its stacked slot, as `needed` cut it, quantized on the way if
        asked (o / down whole, then this rank's columns: what a one-process load would hold)."""
        stack, part = PROJECTIONS[param]
        rows, k, (r0, r1), _, cols = self._share(stack, part)
        total = sum(rows)
        if self.scheme is None:
            buf = self._buffer(i, stack, lambda: torch.empty(total, k, dtype=self.dtype, device=self.device))
            buf[r0:r1].copy_(w)
        else:
            scheme = REGISTRY[self.scheme]
            q, s = scheme.quantize(w, self.group, device=self.device)
            if cols is not None:
                q, s = scheme.input_columns(q, s, cols[0], cols[1], self.group)
            self._buffer(i, stack, lambda: torch.empty(scheme.qweight_shape(total, k), dtype=scheme.qweight_dtype,
                                                       device=self.device))[r0:r1] = q
            self._buffer(i, stack + ".scales", lambda: torch.empty(scheme.scales_shape(total, k, self.group),
                                                                   dtype=torch.float32, device=self.device))[r0:r1] = s

    def put_quantized(self, i: int, param: str, kind: str, t: torch.Tensor) -> None:
        """A pre-quantized projection's qweight or scales into its stacked slot, as stored (this
        rank's share of it)."""
        stack, part = PROJECTIONS[param]
        rows, _, (r0, r1), mine, cols = self._share(stack, part)
        if mine is not None:
            t = t[mine[0]:mine[1]]
        if cols is not None:
            scheme = REGISTRY[self.scheme]
            t = scheme.qweight_columns(t, *cols) if kind == "qweight" else scheme.scales_columns(t, *cols, self.group)
        key = stack if kind == "qweight" else stack + ".scales"
        self._buffer(i, key, lambda: torch.empty((sum(rows),) + tuple(t.shape[1:]), dtype=t.dtype,
                                                 device=self.device))[r0:r1] = t.to(self.device)

    def decoder_layers(self) -> List[List[torch.Tensor]]:
        return [LayerWeights(layer["input_layernorm"], layer["qkv"], layer["o"], layer["post_attention_layernorm"],
                             layer["gate_up"], layer["down"], *(layer.get(f"{p}.scales") for p in self.parts))
                .as_list() for layer in self.layers]


def estimate_bytes(config: dict, *, dtype: torch.dtype = torch.bfloat16, weights: Optional[str] = None,
                   group_size: Optional[int] = None, head_dim_out: int = 0) -> Dict[str, int]:
    """What from_pretrained keeps on the device for a language model of this config, in bytes:
    "layers" (the decoder layers' projections, quantized as asked, and norms), "embed" (the
    embedding table in `dtype`), "head" (final norm, regression head [head_dim_out, hidden] and,
    for Emu2, project_up, in `dtype`), and "float_layer" (one layer's projections in `dtype`; a
    quantized load holds one projection of it at a time beside the result)."""
    shape = shape_of(config, Path("<config>"))
    size = torch.empty(0, dtype=dtype).element_size()
    kv = shape.kv_heads * shape.head_dim
    projections = [(shape.hidden + 2 * kv, shape.hidden), (shape.hidden, shape.hidden),
                   (2 * shape.intermediate, shape.hidden), (shape.hidden, shape.intermediate)]
    scheme = None if weights is None else scheme_named(weights, "estimate_bytes")
    group = None if scheme is None else scheme.group(group_size, "estimate_bytes")

    def stored(rows, k):
        return rows * k * size if scheme is None else scheme.stored_bytes(rows, k, group)

    layer = sum(stored(r, k) for r, k in projections) + 2 * shape.hidden * size
    float_layer = sum(r * k for r, k in projections) * size
    return {"layers": shape.layers * layer, "embed": int(config.get("vocab_size") or 0) * shape.hidden * size,
            "head": (shape.hidden + 2 * head_dim_out * shape.hidden) * size, "float_layer": float_layer}


def nbytes(shape, dtype) -> int:
    size = 1
    for s in shape:
        size *= s
    return size * (torch.empty(0, dtype=dtype).element_size() if isinstance(dtype, torch.dtype) else 1)


def check_shape(name, role, ckpt: Checkpoint, shape: LlamaShape, slots: Slots, scheme, group) -> None:
    got, dtype = ckpt.shapes[name]
    f = ckpt.weight_map[name]
    if role == "embed":
        want = (got[0] if len(got) == 2 else -1, shape.hidden)
    elif role == "norm":
        want = (shape.hidden,)
    elif role == "head":
        want = (got[0] if len(got) == 2 else -1, shape.hidden)
    elif role == "up":
        want = (shape.hidden, got[1] if len(got) == 2 else -1)
    else:
        _, _, param = role.split(".", 2)
        kind = param.rsplit(".", 1)[1]
        param = param.rsplit(".", 1)[0]
        if param in NORMS:
            want = (shape.hidden,)
        else:
            rows, k = slots.projection_shape(param)
            if kind == "weight":
                want = (rows, k)
            elif kind == "qweight":
                want = REGISTRY[scheme].qweight_shape(rows, k)
                wanted_dtype = REGISTRY[scheme].qweight_dtype
                if dtype != wanted_dtype:
                    _fail(f, f"{name} is {dtype}; {scheme} qweights are {wanted_dtype}")
            else:
                want = REGISTRY[scheme].scales_shape(rows, k, group)
                if dtype != torch.float32:
                    _fail(f, f"{name} is {dtype}; scales are torch.float32")
    if tuple(got) != tuple(want) or -1 in want:
        _fail(f, f"{name} has shape {list(got)}; the config ({shape.layers} layers, hidden {shape.hidden}, "
                 f"intermediate {shape.intermediate}, {shape.heads} heads / {shape.kv_heads} KV heads) gives "
                 f"{[w for w in want]}")
    if role in ("embed", "norm", "head", "up") or role.endswith(".weight"):
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            _fail(f, f"{name} is {dtype}, not a float tensor")


def place(t: torch.Tensor, role: str, slots: Slots, other: Dict[str, torch.Tensor], dtype, target,
           prequantized: bool) -> None:
    if role in ("embed", "norm", "head", "up"):
        other[role] = t.to(device=target, dtype=dtype, copy=True)
        return
    _, i, param = role.split(".", 2)
    i = int(i)
    base, kind = param.rsplit(".", 1)
    if base in NORMS:
        slots.layers[i][base] = t.to(device=target, dtype=dtype, copy=True)
    elif kind == "weight":
        # this rank's share only (all of it without tensor parallelism), in the model's dtype first:
        # quantized as the loaded model would be
        w = slots.needed(base, t).to(device=target, dtype=dtype)
        try:
            slots.put_projection(i, base, w)  # the quantizer refuses non-finite weights
        except ValueError as e:
            raise CheckpointError(f"emu_fast.from_pretrained: {role}: {e}") from None
        del w
    else:
        if kind == "scales" and not bool((torch.isfinite(t) & ((t == 0) | (t >= MIN_SCALE))).all()):
            raise CheckpointError(f"emu_fast.from_pretrained: {role} holds scales that are NaN, inf, negative or "
                                  f"subnormal; scales are 0 (an all-zero row or group) or at least {MIN_SCALE!r}")
        slots.put_quantized(i, base, kind, t)
