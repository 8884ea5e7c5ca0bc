"""Where a split model's layers run: the segment plan.

A model spread over several devices (Hugging Face accelerate's `device_map`, as the Emu2 README
loads Emu2 over two GPUs) keeps each decoder layer whole on one device. EmuDecoder runs every
layer where its weights are: each maximal run of consecutive layers on one device is a
*segment* with its own KV cache there, and the hidden state moves between devices once per
boundary. The regression head (final norm, head, Emu2's project_up) runs on the head's device,
where outputs are returned.

Weights offloaded to CPU or disk (meta tensors under accelerate hooks) cannot be run from: they
are refused with the first such module named (model_checks.check_weights_loaded).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Sequence

import torch
from torch import nn

from .model_checks import check_weights_loaded


@dataclass(frozen=True)
class Segment:
    start: int            # first layer
    stop: int             # one past the last layer
    device: torch.device


def plan_segments(layer_devices: Sequence[torch.device], split_before: Iterable[int] = ()) -> List[Segment]:
    """Maximal runs of consecutive layers on one device, also cut before each layer index in
    `split_before` (to run the split path on one device, as the tests do)."""
    devices = [torch.device(d) for d in layer_devices]
    if not devices:
        raise ValueError("emu_fast: a model needs at least one decoder layer")
    cuts = set()
    for i in split_before:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 < i < len(devices):
            raise ValueError(f"emu_fast: split_before takes layer indices in 1..{len(devices) - 1}, got {i!r}")
        cuts.add(i)
    plan, start = [], 0
    for i in range(1, len(devices) + 1):
        if i == len(devices) or devices[i] != devices[start] or i in cuts:
            plan.append(Segment(start, i, devices[start]))
            start = i
    return plan


def layer_devices(layers: Sequence[nn.Module], prefix: str = "model.layers") -> List[torch.device]:
    """The device of each decoder layer's weights. Refuses offloaded weights (meta tensors beside
    real ones: accelerate's CPU/disk offload), naming the first, and a layer whose weights
    straddle devices (accelerate keeps a LlamaDecoderLayer whole when it is in
    no_split_module_classes, as the Emu2 README's recipe has it). A model wholly on the meta
    device passes: a decoder over it has shapes only (for sizing), and accelerate() refuses it."""
    params = [p for layer in layers for p in layer.parameters()]
    if any(p.is_meta for p in params) and not all(p.is_meta for p in params):
        check_weights_loaded([(f"{prefix}.{i}", layer) for i, layer in enumerate(layers)])
    devices = []
    for i, layer in enumerate(layers):
        found = {p.device for p in layer.parameters()}
        if len(found) != 1:
            raise ValueError(f"emu_fast: {prefix}.{i} has weights on {sorted(str(d) for d in found)}; each decoder "
                             "layer must sit on one device (pass no_split_module_classes=['LlamaDecoderLayer'] "
                             "to accelerate's infer_auto_device_map)")
        devices.append(found.pop())
    return devices
