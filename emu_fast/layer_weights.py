"""One decoder layer's weights as EmuDecoder takes them: a named structure, turned into the
positional list of the binding in one place (the float and quantized packers and the checkpoint
loader all build these)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch


@dataclass
class LayerWeights:
    """input_norm / post_norm [H]; qkv: q, k, v stacked by rows; gate_up: gate, up stacked; o, down.
    Float projections in the model's dtype, or quantized (int8 [rows, K], int4 packed
    [rows, K / 2]) with their float32 scales (emu_fast/quant/schemes.py states the layouts)."""

    input_norm: torch.Tensor
    qkv: torch.Tensor
    o: torch.Tensor
    post_norm: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor
    qkv_scales: Optional[torch.Tensor] = None
    o_scales: Optional[torch.Tensor] = None
    gate_up_scales: Optional[torch.Tensor] = None
    down_scales: Optional[torch.Tensor] = None

    @property
    def quantized(self) -> bool:
        return self.qkv_scales is not None

    @classmethod
    def from_list(cls, parts: List[torch.Tensor]) -> "LayerWeights":
        """The inverse of as_list: 6 tensors, or 10 with the scales."""
        if len(parts) not in (6, 10):
            raise ValueError(f"emu_fast: a layer is 6 tensors, or 10 with the scales; got {len(parts)}")
        return cls(*parts)

    def as_list(self) -> List[torch.Tensor]:
        """[input_norm, qkv, o, post_norm, gate_up, down] (+ [qkv, o, gate_up, down scales] when
        quantized): the EmuDecoder binding's order."""
        parts = [self.input_norm, self.qkv, self.o, self.post_norm, self.gate_up, self.down]
        scales = [self.qkv_scales, self.o_scales, self.gate_up_scales, self.down_scales]
        if any(s is not None for s in scales):
            if any(s is None for s in scales):
                raise ValueError("emu_fast: a quantized layer needs the scales of all four projections")
            parts += scales
        return parts
