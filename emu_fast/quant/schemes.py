"""Weight-only quantization schemes, in plain PyTorch: their definition, the oracle the
kernels (torch.ops.emu_fast.gemv_int8 / gemv_int4) are tested against, and the scheme registry
(REGISTRY: one QuantScheme per scheme, which everything else looks a scheme up in instead of
branching on its name or bits). Weights are nn.Linear's [N, K] (out_features, in_features); activations are not
quantized by default (bfloat16 ones reach the CPU kernels as int16 blocks; int8 ones are opt-in:
see the end of this note).

int8, symmetric per output channel (row):
    scale[n] = max_k |w[n, k]| / 127                      (float32)
    q[n, k]  = clamp(round(w[n, k] / scale[n]), -127, 127)  (int8; round half to even)
    w'[n, k] = q[n, k] * scale[n]
  A row of zeros gets scale 0 and q 0, and dequantizes to zeros (no NaN). A scale is never
  subnormal: one below 2^-126 (float32's smallest normal) is raised to it (MIN_SCALE); so every
  scale is 0 or a normal positive float32, for int4 too, which is what load_quantized accepts.

int4, symmetric group-wise along the input dimension (groups of `group_size` consecutive
inputs of one row, default 128, a multiple of 32; the last group of a row is shorter when
K % group_size != 0, and a group_size of at least K makes the row one group, whatever its size:
scales [N, 1], nothing padded to the group):
    scale[n, g] = max_{k in g} |w[n, k]| / 7                (float32)
    q[n, k]     = clamp(round(w[n, k] / scale[n, g]), -7, 7)  (values in [-7, 7]; -8 is never written)
    w'[n, k]    = q[n, k] * scale[n, k // group_size]
  Packing, two values a byte (uint8 [N, ceil(K / 32) * 16]): each row is cut into blocks of 32
  values, the last zero-padded; block j is bytes 16 j .. 16 j + 15, and byte 16 j + i holds
  value 32 j + i in its LOW nibble and value 32 j + 16 + i in its HIGH nibble, each stored as
  q + 8 (so 0..15; padding holds 8, i.e. 0). This order lets the kernels widen one byte load to
  two runs of consecutive values without shuffles.

The kernels compute y = x @ w'^T in float32 with w' exactly as `dequantize_*(..., torch.float32)`
returns it, except for the order of float32 additions (int8: scale[n] * sum_k q x; int4:
sum_g scale[n, g] * sum_{k in g} q x). Quantizing works on a few rows at a time
(`_ROWS_PER_CHUNK`), so its temporaries stay small beside the weight itself.

Activations in bfloat16 / float16 reach the CPU kernels as int16 (`round_inputs_to_int16`: each
block of 64 inputs of a row becomes int16 multiples of a power of two, exact for every input at
least 2^-7 of its block's largest |x| in bfloat16, off by at most 2^-15 of it otherwise, far
below bfloat16's own rounding), so the products are exact integer dot products (vpmaddwd).
float32 activations are taken as they are. emu_fast.set_quantized_activations changes this for
the process; its opt-in "int8" rounds each block of 128 inputs to int8 (`round_inputs_to_int8`).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

INT8_MAX = 127
INT4_MAX = 7
INT4_BLOCK = 32              # values per packed block (16 bytes); group sizes are multiples of it
DEFAULT_GROUP_SIZE = 128
_ROWS_PER_CHUNK = 256        # rows quantized at once: temporaries of 256 x K float32


def _check_weight(fn: str, w: torch.Tensor) -> None:
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ValueError(f"emu_fast.{fn}: expects a 2-D [out_features, in_features] weight, got "
                         f"{tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__}")
    if not w.is_floating_point():
        raise TypeError(f"emu_fast.{fn}: expects a floating-point weight, got {w.dtype}")
    if w.is_meta:
        raise ValueError(f"emu_fast.{fn}: the weight is on the meta device (not loaded)")
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"emu_fast.{fn}: the weight has inf or NaN entries; they cannot be quantized")


MAX_GROUP_SIZE = 2 ** 63 - INT4_BLOCK   # the largest multiple of 32 the kernels' int64 holds


def check_group_size(group_size: int, fn: str = "quantize_int4") -> int:
    """group_size as given: a positive multiple of 32 up to MAX_GROUP_SIZE. A group at least as
    long as a row is that row's one group (nothing is padded to the group)."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0 \
            or group_size % INT4_BLOCK != 0:
        raise ValueError(f"emu_fast.{fn}: group_size must be a positive multiple of {INT4_BLOCK}, got {group_size!r}")
    if group_size > MAX_GROUP_SIZE:
        raise ValueError(f"emu_fast.{fn}: group_size must be at most 2**63 - {INT4_BLOCK} (any group at least as "
                         f"long as a row is one group a row), got {group_size!r}")
    return group_size


# The smallest scale a nonzero row / group gets: float32's smallest normal number. Below it a
# scale would be subnormal (amax < qmax * 2^-126, weights that are zero for any purpose), losing
# bits of its own; the file loader refuses subnormal scales (quantized_io).
MIN_SCALE = torch.finfo(torch.float32).tiny


def _symmetric(w: torch.Tensor, amax: torch.Tensor, qmax: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(q, scale) for float32 w with amax broadcastable to it: scale = amax / qmax (at least
    MIN_SCALE), q rounded and clamped to [-qmax, qmax]; where amax is 0, scale 0 and q 0."""
    scale = torch.where(amax == 0, amax, (amax / qmax).clamp(min=MIN_SCALE))
    q = torch.round(w / torch.where(scale == 0, torch.ones_like(scale), scale)).clamp_(-qmax, qmax)
    return q, scale


# ------------------------------------------------------------------------------------ int8


def quantize_int8(w: torch.Tensor, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (qweight int8 [N, K], scales float32 [N]), on `device` (default w's):
    w goes there a chunk of rows at a time, so the device never holds all of it."""
    _check_weight("quantize_int8", w)
    N, K = w.shape
    device = w.device if device is None else torch.device(device)
    qweight = torch.empty(N, K, dtype=torch.int8, device=device)
    scales = torch.empty(N, dtype=torch.float32, device=device)
    for n0 in range(0, N, _ROWS_PER_CHUNK):
        rows = w[n0:n0 + _ROWS_PER_CHUNK].to(device).float()
        amax = rows.abs().amax(dim=1, keepdim=True) if K else rows.new_zeros(rows.shape[0], 1)
        q, scale = _symmetric(rows, amax, INT8_MAX)
        qweight[n0:n0 + rows.shape[0]] = q.to(torch.int8)
        scales[n0:n0 + rows.shape[0]] = scale[:, 0]
    return qweight, scales


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """The weight gemv_int8 computes with: qweight * scales[:, None] in float32, then `dtype`."""
    return (qweight.float() * scales.float()[:, None]).to(dtype)


# ------------------------------------------------------------------------------------ int4


def int4_row_bytes(in_features: int) -> int:
    return (in_features + INT4_BLOCK - 1) // INT4_BLOCK * INT4_BLOCK // 2


def int4_groups(in_features: int, group_size: int) -> int:
    return (in_features + group_size - 1) // group_size


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Values int [N, K] in [-8, 7] -> uint8 [N, ceil(K/32)*16] in the layout of the module
    docstring (value + 8 in nibbles; block j, byte i: low = 32j+i, high = 32j+16+i)."""
    N, K = q.shape
    k_pad = int4_row_bytes(K) * 2
    u = torch.full((N, k_pad), 8, dtype=torch.uint8, device=q.device)
    u[:, :K] = (q.to(torch.int16) + 8).to(torch.uint8)
    blocks = u.view(N, k_pad // INT4_BLOCK, 2, INT4_BLOCK // 2)   # [N, blocks, low/high, 16]
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(N, k_pad // 2)


def unpack_int4(qweight: torch.Tensor, in_features: int) -> torch.Tensor:
    """The inverse of pack_int4: uint8 [N, ceil(K/32)*16] -> int8 values [N, K] in [-8, 7]."""
    N, nbytes = qweight.shape
    if nbytes != int4_row_bytes(in_features):
        raise ValueError(f"emu_fast.unpack_int4: {nbytes} bytes per row do not hold {in_features} int4 values "
                         f"({int4_row_bytes(in_features)} bytes)")
    blocks = qweight.view(N, nbytes // (INT4_BLOCK // 2), 1, INT4_BLOCK // 2)
    u = torch.cat([blocks & 15, blocks >> 4], dim=2).reshape(N, nbytes * 2)[:, :in_features]
    return u.to(torch.int8) - 8


def quantize_int4(w: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE,
                  device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (qweight uint8 [N, ceil(K/32)*16], scales float32 [N, ceil(K/group_size)]),
    on `device` (default w's), w taken there a chunk of rows at a time as in quantize_int8."""
    _check_weight("quantize_int4", w)
    check_group_size(group_size)
    N, K = w.shape
    G = int4_groups(K, group_size)
    device = w.device if device is None else torch.device(device)
    qweight = torch.empty(N, int4_row_bytes(K), dtype=torch.uint8, device=device)
    scales = torch.empty(N, G, dtype=torch.float32, device=device)
    for n0 in range(0, N, _ROWS_PER_CHUNK):
        rows = w[n0:n0 + _ROWS_PER_CHUNK].to(device).float()
        n = rows.shape[0]
        # A group at least as long as the row is the row (not padded to the group's length).
        span = K if G == 1 else group_size
        padded = rows.new_zeros(n, G * span)
        padded[:, :K] = rows
        grouped = padded.view(n, G, span)
        q, scale = _symmetric(grouped, grouped.abs().amax(dim=2, keepdim=True), INT4_MAX)
        qweight[n0:n0 + n] = pack_int4(q.view(n, G * span)[:, :K].to(torch.int8))
        scales[n0:n0 + n] = scale[:, :, 0]
    return qweight, scales


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, in_features: int,
                    group_size: int = DEFAULT_GROUP_SIZE, dtype=torch.float32) -> torch.Tensor:
    """The weight gemv_int4 computes with: value * scale of its group, in float32, then `dtype`."""
    check_group_size(group_size, "dequantize_int4")
    q = unpack_int4(qweight, in_features).float()
    # min: a group at least as long as the row is the row's one group
    per_input = scales.float().repeat_interleave(min(group_size, in_features), dim=1)[:, :in_features]
    return (q * per_input).to(dtype)


# ------------------------------------------------------------------------------ int16 inputs

INT16_INPUT_BLOCK = 64       # inputs that share one power-of-two step (kernels: kInt16Block)


def round_inputs_to_int16(x: torch.Tensor, block: int = INT16_INPUT_BLOCK) -> torch.Tensor:
    """x (float, [..., K]) as the CPU kernels take bfloat16 activations (QuantizedInput::kInt16,
    csrc/kernels/quantized_gemv.h), in float64: each block of `block` inputs along the last
    dimension (the last one shorter) is rounded half to even to integer multiples of its step
    2^(e - 15), e the exponent with max|x| of the block < 2^e, and clamped to 32767 steps."""
    x = x.double()
    K = x.shape[-1]
    padded = torch.nn.functional.pad(x, (0, (-K) % block)).unflatten(-1, (-1, block))
    _, e = torch.frexp(padded.abs().amax(-1, keepdim=True))   # max = m * 2^e, m in [0.5, 1)
    step = torch.ldexp(torch.ones_like(padded[..., :1]), e - 15)
    return (torch.round(padded / step).clamp(max=32767) * step).flatten(-2)[..., :K]


# ------------------------------------------------------------------------------ int8 inputs

INT8_INPUT_BLOCK = 128       # inputs that share one step (kernels: kInt8Block)


def round_inputs_to_int8(x: torch.Tensor, block: int = INT8_INPUT_BLOCK) -> torch.Tensor:
    """x (float, [..., K]) as the CPU kernels take it under set_quantized_activations("int8")
    (QuantizedInput::kInt8, csrc/kernels/quantized_gemv.h), in float64: for each block of `block`
    inputs (the last one shorter), max|x| = m * 2^e with m in [0.5, 1), each input becomes
    v = round_half_even(float32(x * 2^-e) * float32(127 / m)) in [-127, 127] times the block's step
    float32(m / 127) * 2^e. A block of zeros stays zeros."""
    x = x.float()
    K = x.shape[-1]
    padded = torch.nn.functional.pad(x, (0, (-K) % block)).unflatten(-1, (-1, block))
    m, e = torch.frexp(padded.abs().amax(-1, keepdim=True))
    zero = m == 0
    m = torch.where(zero, torch.ones_like(m), m)
    exact = padded.double() * torch.pow(2.0, -e.double())     # x * 2^-e, exact in float64 ...
    down = exact.float()                                      # ... rounded once, as ldexp does
    v = torch.round(down * (torch.tensor(127.0) / m)).clamp(-127, 127)
    step = ((m / 127).double() * torch.pow(2.0, e.double())).float()
    out = torch.where(zero, torch.zeros_like(v, dtype=torch.float64), v.double() * step.double())
    return out.flatten(-2)[..., :K]


# ------------------------------------------------------------------------------ the registry


class QuantScheme:
    """One weight-only scheme, all that the rest of emu_fast asks of it: its name, its bits (what
    the C++ EmuDecoder takes as weight_bits), the layout and shapes of its qweight / scales, how
    to quantize and dequantize (the packing included), and the op its GEMV runs on. Grouped
    schemes take a group_size (inputs sharing a scale); the others have one scale per row."""

    name: str
    bits: int
    qweight_dtype: torch.dtype
    empty_code: int          # the byte an empty qweight holds: the code of 0
    op: str                  # torch.ops.emu_fast.<op>(x, qweight, scales[, group_size])
    grouped: bool

    def group(self, group_size: Optional[int], fn: str = "quantize") -> Optional[int]:
        """The group size this scheme runs with: None for a scheme without groups, else
        group_size checked (DEFAULT_GROUP_SIZE when None)."""
        return None

    def qweight_shape(self, rows: int, in_features: int) -> Tuple[int, ...]:
        raise NotImplementedError

    def scales_shape(self, rows: int, in_features: int, group: Optional[int]) -> Tuple[int, ...]:
        raise NotImplementedError

    def quantize(self, w: torch.Tensor, group: Optional[int] = None, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def dequantize(self, qweight: torch.Tensor, scales: torch.Tensor, in_features: int, group: Optional[int] = None,
                   dtype=torch.float32) -> torch.Tensor:
        raise NotImplementedError

    def gemv(self, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group: Optional[int] = None):
        """x [B, K] @ the dequantized weight^T, by the scheme's op."""
        op = getattr(torch.ops.emu_fast, self.op)
        return op(x, qweight, scales, group) if self.grouped else op(x, qweight, scales)

    def shard_check(self, shard_inputs: int, group: Optional[int]) -> Optional[str]:
        """Why a projection cannot be cut into column shards of `shard_inputs` inputs (tensor
        parallelism), or None when it can."""
        return None

    def input_columns(self, qweight: torch.Tensor, scales: torch.Tensor, k0: int, k1: int,
                      group: Optional[int]) -> Tuple[torch.Tensor, torch.Tensor]:
        """The projection restricted to its inputs [k0, k1) (a tensor-parallel rank's share of o or
        down): its qweight and scales, as a projection of k1 - k0 inputs stores them."""
        return self.qweight_columns(qweight, k0, k1), self.scales_columns(scales, k0, k1, group)

    def qweight_columns(self, qweight: torch.Tensor, k0: int, k1: int) -> torch.Tensor:
        raise NotImplementedError

    def scales_columns(self, scales: torch.Tensor, k0: int, k1: int, group: Optional[int]) -> torch.Tensor:
        raise NotImplementedError

    def stored_bytes(self, rows: int, in_features: int, group: Optional[int]) -> int:
        """Bytes of a [rows, in_features] projection stored in this scheme (qweight and scales)."""
        q = torch.empty(0, dtype=self.qweight_dtype).element_size()
        return _numel(self.qweight_shape(rows, in_features)) * q + _numel(self.scales_shape(rows, in_features, group)) * 4

    def group_note(self, group: Optional[int]) -> str:
        """" (group 128)" for a grouped scheme's group, "" otherwise (for messages)."""
        return f" (group {group})" if self.grouped and group else ""

    def __repr__(self) -> str:
        return f"<emu_fast scheme {self.name}>"


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class _Int8(QuantScheme):
    name, bits, qweight_dtype, empty_code, op, grouped = "int8", 8, torch.int8, 0, "gemv_int8", False

    def qweight_shape(self, rows, in_features):
        return (rows, in_features)

    def scales_shape(self, rows, in_features, group):
        return (rows,)

    def quantize(self, w, group=None, device=None):
        return quantize_int8(w, device=device)

    def dequantize(self, qweight, scales, in_features, group=None, dtype=torch.float32):
        return dequantize_int8(qweight, scales, dtype)

    def qweight_columns(self, qweight, k0, k1):
        return qweight[:, k0:k1]

    def scales_columns(self, scales, k0, k1, group):
        return scales  # one scale per row, shared by every column shard


class _Int4(QuantScheme):
    name, bits, qweight_dtype, empty_code, op, grouped = "int4", 4, torch.uint8, 0x88, "gemv_int4", True

    def group(self, group_size, fn="quantize"):
        return DEFAULT_GROUP_SIZE if group_size is None else check_group_size(group_size, fn)

    def qweight_shape(self, rows, in_features):
        return (rows, int4_row_bytes(in_features))

    def scales_shape(self, rows, in_features, group):
        return (rows, int4_groups(in_features, group))

    def quantize(self, w, group=None, device=None):
        return quantize_int4(w, DEFAULT_GROUP_SIZE if group is None else group, device=device)

    def dequantize(self, qweight, scales, in_features, group=None, dtype=torch.float32):
        return dequantize_int4(qweight, scales, in_features, DEFAULT_GROUP_SIZE if group is None else group, dtype)

    def shard_check(self, shard_inputs, group):
        group = DEFAULT_GROUP_SIZE if group is None else group
        if shard_inputs % group:
            return f"int4's group_size {group} does not divide a shard's {shard_inputs} inputs (a group may not straddle two ranks)"
        return None

    def qweight_columns(self, qweight, k0, k1):
        return qweight[:, k0 // 2 : k1 // 2]  # whole groups, so whole blocks: block j is bytes 16 j .. 16 j + 15

    def scales_columns(self, scales, k0, k1, group):
        group = DEFAULT_GROUP_SIZE if group is None else group
        return scales[:, k0 // group : k1 // group]


INT8, INT4 = _Int8(), _Int4()
REGISTRY: Dict[str, QuantScheme] = {s.name: s for s in (INT8, INT4)}
SCHEMES = tuple(REGISTRY)
GROUPED = tuple(name for name, s in REGISTRY.items() if s.grouped)


def scheme_named(weights: str, fn: str = "quantize") -> QuantScheme:
    """The registered scheme called `weights`; ValueError naming the known ones otherwise."""
    if weights not in REGISTRY:
        raise ValueError(f"emu_fast.{fn}: unknown weight scheme {weights!r}; known: {', '.join(SCHEMES)}")
    return REGISTRY[weights]


def scheme_of_bits(bits: int) -> Optional[QuantScheme]:
    """The scheme of an EmuDecoder's weight_bits (0: float weights, None)."""
    return None if bits == 0 else next(s for s in REGISTRY.values() if s.bits == bits)
