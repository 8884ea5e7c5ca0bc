"""EmuDecoder: the C++ decoder (emu_fast._C.EmuDecoder) plus a constructor from a Hugging Face
LLaMA, and the thin causal loop that drives it."""
from __future__ import annotations

import os
import warnings
from typing import Iterable, Optional

import torch

from . import _C
from .config import LlamaShape, check_llama_config
from .dropin.packing import pack_layers
from .dropin.segments import layer_devices, plan_segments
from .dropin.walk import llama_body_of
from .parallel import check_same_inputs, resolve_group, shard_layers
from .quant.apply import prepare_quantization
from .quant.schemes import REGISTRY, scheme_of_bits
from .rope import model_rope_fn, theta_rope_tables

KERNELS = ("auto", "custom", "aten")

# No capacity is guessed: the KV cache grows to the largest request (batch x prompt + n
# outputs, lengths rounded up to a multiple of 128). max_batch / max_seq_len are optional upper
# limits (None: none besides memory).
DEFAULT_MAX_BATCH = None
DEFAULT_MAX_SEQ_LEN = None


def _check_kernels(kernels):
    if kernels not in KERNELS:
        raise ValueError(f"emu_fast: kernels must be one of {KERNELS}, got {kernels!r}")


INT64_MAX = 2 ** 63 - 1  # what the C++ decoder's sizes hold


def _check_limit(name, value):
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"emu_fast: {name} must be a positive int or None (no limit), got {value!r}")
    _check_limit_fits(name, value)


def _check_limit_fits(name, value):
    """A limit past int64 (the C++ decoder's) as a ValueError naming it, not pybind's signature dump."""
    if isinstance(value, int) and value > INT64_MAX:
        raise ValueError(f"emu_fast: {name} must be at most 2**63 - 1 (or None: no limit), got {value!r}")


def _check_size(who, name, value):
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= INT64_MAX:
        raise ValueError(f"emu_fast.{who}: {name} must be an int in [0, 2**63 - 1], got {value!r}")


class EmuDecoder(_C.EmuDecoder):
    __doc__ = _C.EmuDecoder.__doc__

    def __init__(self, layers, final_norm, head_weight, up_weight=None, *, num_heads, num_kv_heads, rms_eps,
                 max_batch=DEFAULT_MAX_BATCH, max_seq_len=DEFAULT_MAX_SEQ_LEN, rope_cos=None, rope_sin=None,
                 rope_theta=None, rope_fn=None, kernels="auto", segment_starts=None, weight_bits=0, group_size=0,
                 tensor_parallel=None):
        _check_kernels(kernels)
        # One rank of a tensor-parallel group (emu_fast.parallel): the layers are this rank's
        # shards (shard_layers), num_heads / num_kv_heads the whole model's.
        self._tp = resolve_group(tensor_parallel, "EmuDecoder")
        if self._tp is not None:
            self._tp.check_device(final_norm.device, "EmuDecoder")
        _check_limit_fits("max_batch", max_batch)  # the rest is checked in C++
        _check_limit_fits("max_seq_len", max_seq_len)
        self._warned_fallback = False
        # By hand, without a model: tables from rope_theta, extended on demand (from_llama passes
        # the model's own through rope_fn). Tables passed without rope_fn are all there is.
        if rope_cos is None and rope_sin is None:
            head_dim = final_norm.shape[0] // num_heads
            if rope_fn is None:
                theta = 10000.0 if rope_theta is None else rope_theta
                device = final_norm.device

                def rope_fn(positions):
                    return theta_rope_tables(head_dim, positions, theta, device)
            elif rope_theta is not None:
                raise ValueError("emu_fast.EmuDecoder: pass either rope_fn or rope_theta, not both")
            rope_cos = rope_sin = torch.empty(0, head_dim // 2, dtype=torch.float32, device=final_norm.device)
        elif rope_theta is not None:
            raise ValueError("emu_fast.EmuDecoder: pass either rope_cos/rope_sin or rope_theta, not both")
        super().__init__(layers, final_norm, head_weight, up_weight, num_heads=num_heads, num_kv_heads=num_kv_heads,
                         rms_eps=rms_eps, rope_cos=rope_cos, rope_sin=rope_sin, max_batch=max_batch,
                         max_seq_len=max_seq_len, rope_fn=rope_fn, kernels=kernels,
                         segment_starts=list(segment_starts or []), weight_bits=weight_bits,
                         group_size=group_size or 0, tp_size=1 if self._tp is None else self._tp.size,
                         tp_group="" if self._tp is None else self._tp.name)

    @classmethod
    def from_llama(cls, lm, head_weight: torch.Tensor, up_weight: Optional[torch.Tensor] = None, *,
                   max_batch: Optional[int] = DEFAULT_MAX_BATCH,
                   max_seq_len: Optional[int] = DEFAULT_MAX_SEQ_LEN, kernels: str = "auto",
                   split_before: Iterable[int] = (), weights: Optional[str] = None,
                   group_size: Optional[int] = None, tensor_parallel=None) -> "EmuDecoder":
        """A decoder over a Hugging Face LlamaForCausalLM's body, with the given regression head
        (and Emu2's project_up). Packs QKV and gate/up in place (the model keeps working); no
        layer weight is copied. The KV cache grows to the largest request; max_batch prompts of up
        to max_seq_len tokens each (prompt + generated embeddings) are optional limits (None: no
        limit). RoPE comes from the model's own rotary module (emu_fast.rope), asked for more
        positions as requests need, so a model whose frequencies were rounded runs as it is.

        kernels: "auto" (ours, checked against ATen at first use; ATen where we have none),
        "custom" or "aten" (the portable step: any torch device).

        A model split over devices (accelerate's device_map) runs each layer where its weights are
        (emu_fast.dropin.segments); the head runs on the head's device, with copies there of the final
        norm's weight and of up_weight when those sit elsewhere (a few MB). split_before: more
        segment cuts, at these layer indices, on one device (tests run the split path so).

        weights: None (the projections as the model holds them: float, or Int8Linear /
        Int4Linear from emu_fast.quant.modules), "int8" or "int4": weight-only quantization of
        the decoder body's projections, done in place on `lm` first (emu_fast.quant.schemes states the
        schemes; group_size: int4's group, default 128) unless `lm` is quantized so already.

        tensor_parallel: a torch.distributed ProcessGroup (gloo for a model on the CPU, NCCL on
        CUDA): this process is one rank of it and the decoder holds this rank's share of every
        layer (emu_fast.parallel: whole heads, a slice of the MLP; copied out of the packed
        weights), summing the ranks' partial outputs with two all-reduces a layer. Every rank
        makes the same calls with the same prompts (checked) and gets the same outputs."""
        check_llama_config(lm.config)
        shape = LlamaShape.from_hf(lm.config)
        _check_limit("max_batch", max_batch)
        _check_limit("max_seq_len", max_seq_len)
        _check_kernels(kernels)
        prepare_quantization(lm, weights, group_size, "EmuDecoder.from_llama", apply=False)  # checks only
        body = llama_body_of(lm)
        tp = resolve_group(tensor_parallel, "EmuDecoder.from_llama")
        if tp is not None:
            tp.check_device(head_weight.device, "EmuDecoder.from_llama")
        plan = plan_segments(layer_devices(body.layers), split_before)
        if tp is not None and len(plan) > 1:
            raise ValueError("emu_fast.EmuDecoder.from_llama: a tensor-parallel rank runs every layer on one device; "
                             "load each rank's model on its own device instead of splitting it with a device_map")
        head = head_weight.detach()
        final_norm = body.norm.weight.detach().to(head.device)
        up = None if up_weight is None else up_weight.detach().to(head.device)
        rope_fn = model_rope_fn(lm, shape.head_dim)
        quant = prepare_quantization(lm, weights, group_size, "EmuDecoder.from_llama")
        layers = pack_layers(lm, quantized=quant is not None)
        if tp is not None:
            layers = shard_layers(layers, tp, shape.heads, shape.kv_heads, shape.head_dim,
                                  None if quant is None else REGISTRY[quant[0]], None if quant is None else quant[1],
                                  "EmuDecoder.from_llama")
        return cls(
            layers,
            final_norm,
            head,
            up,
            num_heads=shape.heads,
            num_kv_heads=shape.kv_heads,
            rms_eps=shape.eps,
            max_batch=max_batch,
            max_seq_len=max_seq_len,
            rope_fn=rope_fn,
            kernels=kernels,
            segment_starts=[seg.start for seg in plan],
            weight_bits=0 if quant is None else REGISTRY[quant[0]].bits,
            group_size=0 if quant is None or quant[1] is None else quant[1],
            tensor_parallel=tensor_parallel,
        )

    @property
    def weights(self) -> Optional[str]:
        """The projections' weight-only scheme: "int8", "int4" or None (the model's dtype)."""
        scheme = scheme_of_bits(self.weight_bits)
        return None if scheme is None else scheme.name

    @property
    def dtype(self) -> torch.dtype:
        return self.kv_caches[0].dtype

    @property
    def device(self) -> torch.device:
        """Where outputs come out (the regression head's device)."""
        return torch.device(self.output_device)

    def memory_summary(self) -> dict:
        """Bytes the decoder holds: weights (the tensors it reads, borrowed from the model),
        kv_cache (allocated now, all segments), scratch (everything else it holds: RoPE tables,
        per-row lengths, CUDA graph buffers), the cache's current capacity (batch, seq_len), and
        the KV cache bytes per device."""
        batch, seq_len = self.capacity
        per_device = {}
        for (_, _, device), kv in zip(self.segments, self.kv_caches):
            per_device[device] = per_device.get(device, 0) + kv.numel() * kv.element_size()
        return {"weights": self.weight_bytes, "kv_cache": self.kv_cache_bytes, "scratch": self.scratch_bytes,
                "batch": batch, "seq_len": seq_len, "kv_cache_per_device": per_device}

    def reserve(self, batch: int, seq_len: int) -> None:
        """Grow the KV cache to at least batch x seq_len now (within the limits); never shrinks
        it. ValueError naming an argument that is not an int in [0, 2**63 - 1]."""
        _check_size("EmuDecoder.reserve", "batch", batch)
        _check_size("EmuDecoder.reserve", "seq_len", seq_len)
        return super().reserve(batch, seq_len)

    def _warn_if_fell_back(self):
        """The self-check's fallback, as a Python warning, once per decoder."""
        reason = self.fallback_reason
        if reason and not getattr(self, "_warned_fallback", False):
            self._warned_fallback = True
            warnings.warn(reason, RuntimeWarning, stacklevel=3)

    def step(self, prev_output: torch.Tensor) -> torch.Tensor:
        try:
            return super().step(prev_output)
        finally:
            self._warn_if_fell_back()

    def decode(self, prev_output: torch.Tensor, steps: int) -> torch.Tensor:
        try:
            return super().decode(prev_output, steps)
        finally:
            self._warn_if_fell_back()

    def generate(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, n: int) -> torch.Tensor:
        """The causal loop, in C++ under one lock: prefill, then n-1 steps (a CUDA graph on the
        GPU), each fed the previous output. Returns [B, n, out] on output_device."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"emu_fast: n must be a positive int, got {n!r}")
        # The prompts, the mask and every prompt's room for n - 1 steps are checked in C++
        # (csrc/prompt_mask.cpp, EmuDecoder::generate) before anything runs.
        self._check_same_inputs("generate", inputs_embeds, attention_mask, n)
        try:
            return super().generate(inputs_embeds, attention_mask, n)
        finally:
            self._warn_if_fell_back()

    @property
    def tensor_parallel(self):
        """This rank's tensor-parallel group (emu_fast.parallel.TensorParallel), or None."""
        return getattr(self, "_tp", None)

    def _check_same_inputs(self, who, inputs_embeds, attention_mask, *extra):
        """With tensor parallelism: every rank was called with these same inputs (else ValueError
        on every rank, before any runs them)."""
        tp = getattr(self, "_tp", None)
        if tp is not None and isinstance(inputs_embeds, torch.Tensor) and isinstance(attention_mask, torch.Tensor):
            # the settings that decide which collectives a call makes go in with the inputs
            settings = (self.max_batch, self.max_seq_len, self.kernel_mode, self.kernels, self.fused_cpu_step,
                        self.weight_bits, self.group_size, os.environ.get("EMU_FAST_SELF_CHECK"))
            check_same_inputs(tp, f"EmuDecoder.{who}", (inputs_embeds, attention_mask), extra + settings,
                              device=self.input_device)

    def prefill(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self._check_same_inputs("prefill", inputs_embeds, attention_mask)
        return super().prefill(inputs_embeds, attention_mask)

    def admit(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, steps: int) -> torch.Tensor:
        self._check_same_inputs("admit", inputs_embeds, attention_mask, steps)
        return super().admit(inputs_embeds, attention_mask, steps)
