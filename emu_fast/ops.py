"""Python face of the emu_fast custom ops (torch.ops.emu_fast.*): fake implementations, so
the ops trace under torch.compile / FakeTensor, and typed wrappers. The schemas live in
csrc/ops/<op>.cpp, the kernels in csrc/kernels/cpu and csrc/kernels/cuda."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import _C  # noqa: F401  (loading the extension registers the ops)
from .quant.schemes import REGISTRY

_ops = torch.ops.emu_fast


def _check(op: str, ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(f"emu_fast.{op}: {message}")


def _same_device(op: str, *tensors) -> None:
    """The fake kernels run for meta/fake tensors, where the real kernels' checks do not: a mix
    of devices must fail there too rather than trace to an output on one of them."""
    devices = {t.device for t in tensors if t is not None}
    _check(op, len(devices) <= 1, f"inputs are on different devices: {sorted(map(str, devices))}")


def _checkable(*args):
    """args for the C++ checks, which read concrete sizes: as they are, or, when a tensor has
    symbolic sizes (torch.compile with dynamic shapes), meta stand-ins of the hinted sizes
    (no guards are added). None when a size has no hint (unbacked): the kernel checks at run time."""
    def symbolic(t):
        return any(isinstance(x, torch.SymInt) for x in (*t.shape, *t.stride()))

    if not any(isinstance(a, torch.Tensor) and symbolic(a) for a in args):
        return args

    def hint(x):
        return x.node.hint if isinstance(x, torch.SymInt) else x

    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            size, stride = [hint(x) for x in a.shape], [hint(x) for x in a.stride()]
            if any(x is None for x in (*size, *stride)):
                return None
            a = torch.empty_strided(size, stride, dtype=a.dtype, device="meta")
        out.append(a)
    return out


def _run_check(check, *args, cuda: bool) -> None:
    args = _checkable(*args)
    if args is not None:
        check(*args, cuda)


def _cuda(t) -> bool:
    """Check as the CUDA kernels do (float16, op_limits.h) for CUDA tensors, else as the CPU's."""
    return t.device.type == "cuda"


def _checked(op: str, *args) -> None:
    """The op's checks, for its fake kernel: every tensor on one device, then the op's C++
    argument checks, _C.check_<op>(*args) (the CUDA kernels' when args[0] is a CUDA tensor)."""
    _same_device(op, *(a for a in args if isinstance(a, torch.Tensor)))
    _run_check(getattr(_C, f"check_{op}"), *args, cuda=_cuda(args[0]))


# Each fake kernel runs the op's own C++ argument checks (csrc/ops/checks.cpp, through _C), so meta
# and fake tensors (torch.compile) are refused at trace time exactly as the kernels refuse them.


@torch.library.register_fake("emu_fast::splice_embeddings")
def _(input_ids, embed_table, slot_values, slot_token_id):
    _checked("splice_embeddings", input_ids, embed_table, slot_values)
    return embed_table.new_empty(input_ids.shape[0], input_ids.shape[1], embed_table.shape[1])


@torch.library.register_fake("emu_fast::decode_attention")
def _(q, k, v, k_cache, v_cache, cache_lens, positions, rope_cos, rope_sin, scale, split_counters=None):
    _checked("decode_attention", q, k, v, k_cache, v_cache, cache_lens, positions, rope_cos, rope_sin)
    if split_counters is not None:
        _same_device("decode_attention", q, split_counters)
        _run_check(_C.check_split_counters, q, k_cache, split_counters, cuda=_cuda(q))
    return q.new_empty(q.shape)


@torch.library.register_fake("emu_fast::regression_head")
def _(hidden, norm_weight, eps, head_weight, up_weight):
    _checked("regression_head", hidden, norm_weight, head_weight, up_weight)
    out = hidden.new_empty(hidden.shape[0], head_weight.shape[0])
    nxt = hidden.new_empty(hidden.shape[0], up_weight.shape[0] if up_weight is not None else 0)
    return out, nxt


@torch.library.register_fake("emu_fast::gemv")
def _(x, weight):
    _checked("gemv", x, weight)
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.register_fake("emu_fast::norm_gemv")
def _(x, norm_weight, eps, weight):
    _checked("norm_gemv", x, norm_weight, weight)
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.register_fake("emu_fast::gemv_add")
def _(x, weight, residual):
    _checked("gemv_add", x, weight, residual)
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.register_fake("emu_fast::norm_gemv_silu")
def _(x, norm_weight, eps, gate_up_weight):
    _checked("norm_gemv_silu", x, norm_weight, gate_up_weight)
    return x.new_empty(x.shape[0], gate_up_weight.shape[0] // 2)


@torch.library.register_fake("emu_fast::rms_norm")
def _(x, weight, eps):
    _checked("rms_norm", x, weight)
    return x.new_empty(x.shape)


@torch.library.register_fake("emu_fast::add_rms_norm")
def _(x, residual, weight, eps):
    _checked("add_rms_norm", x, residual, weight)
    return x.new_empty(x.shape), x.new_empty(x.shape)


@torch.library.register_fake("emu_fast::silu_mul")
def _(gate_up):
    _checked("silu_mul", gate_up)
    return gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)


def _register_quantized_gemv_fake(op: str) -> None:
    """The fake of a weight scheme's GEMV, op(x, qweight, scales[, group_size]) -> [B, N]."""
    @torch.library.register_fake(f"emu_fast::{op}")
    def _(x, qweight, scales, *group_size):  # a grouped scheme's op takes its group size
        _checked(op, x, qweight, scales, *group_size)
        return x.new_empty(x.shape[0], qweight.shape[0])


for _scheme in REGISTRY.values():  # gemv_int8, gemv_int4
    _register_quantized_gemv_fake(_scheme.op)


def splice_embeddings(input_ids: torch.Tensor, embed_table: torch.Tensor, slot_values: torch.Tensor,
                      slot_token_id: int) -> torch.Tensor:
    """Embed input_ids [B,T] and write slot_values [S,H] into the slots (id == slot_token_id) in
    row-major order, in one pass. S must equal the number of slots."""
    return _ops.splice_embeddings(input_ids, embed_table, slot_values, slot_token_id)


def decode_attention(q, k, v, k_cache, v_cache, cache_lens, positions, rope_cos, rope_sin,
                     scale: Optional[float] = None, split_counters: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One decode step: RoPE, append k/v to the caches at cache_lens, attend over [0, cache_lens].

    split_counters (optional; CUDA): an int32 buffer of at least B * Hkv zeros that the op leaves
    zero, so the CUDA kernel merges its split-KV partial results in the same launch instead of a
    second one. Keep one per stream and pass it to every call (EmuDecoder does)."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return _ops.decode_attention(q, k, v, k_cache, v_cache, cache_lens, positions, rope_cos, rope_sin, scale,
                                 split_counters)


def regression_head(hidden, norm_weight, eps: float, head_weight,
                    up_weight: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(hidden) @ head^T, that @ up^T or an empty [B,0])."""
    return _ops.regression_head(hidden, norm_weight, eps, head_weight, up_weight)


def gemv(x, weight) -> torch.Tensor:
    return _ops.gemv(x, weight)


def norm_gemv(x, norm_weight, eps: float, weight) -> torch.Tensor:
    """rms_norm(x; norm_weight, eps) @ weight^T, the norm fused into the GEMV."""
    return _ops.norm_gemv(x, norm_weight, eps, weight)


def gemv_add(x, weight, residual) -> torch.Tensor:
    """residual + x @ weight^T, the add fused into the GEMV (the product rounded, then the sum)."""
    return _ops.gemv_add(x, weight, residual)


def norm_gemv_silu(x, norm_weight, eps: float, gate_up_weight) -> torch.Tensor:
    """silu_mul(norm_gemv(x, norm_weight, eps, gate_up_weight)), gate_up_weight = [gate rows; up
    rows]: the gate/up projection with SiLU * mul fused into its epilogue (rounded as that
    composition rounds)."""
    return _ops.norm_gemv_silu(x, norm_weight, eps, gate_up_weight)


def rms_norm(x, weight, eps: float) -> torch.Tensor:
    return _ops.rms_norm(x, weight, eps)


def add_rms_norm(x, residual, weight, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    return _ops.add_rms_norm(x, residual, weight, eps)


def silu_mul(gate_up) -> torch.Tensor:
    return _ops.silu_mul(gate_up)


def gemv_int8(x, qweight, scales) -> torch.Tensor:
    """x [B,K] @ (qweight int8 [N,K] * scales float32 [N, None])^T -> [B,N] in x's dtype (the
    int8 scheme of emu_fast.quant.schemes), the weight dequantized in registers."""
    return _ops.gemv_int8(x, qweight, scales)


def gemv_int4(x, qweight, scales, group_size: int) -> torch.Tensor:
    """x [B,K] @ W^T with W the int4 weight of emu_fast.quant.schemes (qweight uint8 [N, ceil(K/32)*16],
    scales float32 [N, ceil(K/group_size)]) -> [B,N] in x's dtype."""
    return _ops.gemv_int4(x, qweight, scales, group_size)


# ------------------------------------------------------------------ quantized GEMVs' activations

QUANTIZED_ACTIVATIONS = ("auto", "float32", "int16", "int8")


def set_quantized_activations(mode: str) -> None:
    """How the CPU int8 / int4 GEMVs (gemv_int8, gemv_int4, the fused CPU step of a model
    quantized by accelerate(..., weights=...)) take their activations, for the whole process,
    like torch.set_float32_matmul_precision. The CUDA kernels are not affected.

    "auto" (the default): float32 activations as they are; bfloat16 / float16 ones as int16 blocks
        of 64 (emu_fast.quant.schemes.round_inputs_to_int16: exact for every bfloat16 input at least
        2^-7 of its block's largest, far inside bfloat16's own rounding).
    "float32", "int16": that path for every activation dtype.
    "int8": opt-in, coarser than bfloat16: each block of 128 inputs is rounded to int8 multiples
        of max|x| / 127 (emu_fast.quant.schemes.round_inputs_to_int8; an input moves by up to
        max|x| / 254, as llama.cpp's int8 activations do). With int4 weights the AVX2 products
        then take 32 weights an instruction: about 1.5-2x faster GEMVs here. int8 weights gain
        nothing from it (they keep the int16 loop, on these rounded inputs).
    Inputs that are not finite, and int4 groups that are not a multiple of 64, keep float32.
    Each op call and each decoder step reads the setting once, so a change from another thread
    takes effect from the next one; a decoder's first-use self-check runs again for each setting.
    """
    if mode not in QUANTIZED_ACTIVATIONS:
        raise ValueError(f"emu_fast.set_quantized_activations: unknown mode {mode!r}; "
                         f"known: {', '.join(QUANTIZED_ACTIVATIONS)}")
    _C._set_quantized_input("" if mode == "auto" else mode)


def quantized_activations() -> str:
    """The mode set_quantized_activations set ("auto" unless changed)."""
    return _C._quantized_input() or "auto"
