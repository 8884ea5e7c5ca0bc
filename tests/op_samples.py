"""Per-op sample inputs and checks, in one place (extension-cpp style): one list of samples per
op drives the correctness tests against emu_fast.reference on the CPU and a GPU
(tests/ops/test_ops.py), torch.library.opcheck (tests/ops/test_ops.py, tests/gpu/test_cuda.py) and the CUDA
kernels on the emulator (tests/emulators/test_cuda_emulation.py). Tolerances are stated here, by dtype.
Test modules import this, never each other."""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

from emu_fast import reference

# (rtol, atol) against a float32 reference computed from the same (rounded) inputs.
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3)}
# float32 on a GPU: the samples taken from tests/gpu/test_cuda.py (long dot products and softmaxes with
# __expf and fused multiply-adds) allow this; the others keep TOL.
GPU_FP32_TOL = (1e-4, 1e-4)
# flash-attention's rule for low precision: the error against float32 is at most this multiple
# of what the same computation in plain PyTorch at that dtype makes (applied on top of TOL where
# plain PyTorch states the computation directly).
PLAIN_TORCH_FACTOR = 3

CPU_DTYPES = [torch.float32, torch.bfloat16]
CUDA_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def close(actual, expected, dtype, tol=None):
    rtol, atol = tol or TOL[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol)


def within_plain_torch_error(actual, expected32, plain):
    """flash-attention's bound: |actual - expected32| <= k * |plain - expected32| (max over all
    elements), plain being the computation in plain PyTorch at actual's dtype."""
    if actual.dtype == torch.float32 or actual.numel() == 0:
        return
    ours = (actual.float() - expected32.float()).abs().max().item()
    theirs = (plain.float() - expected32.float()).abs().max().item()
    assert ours <= PLAIN_TORCH_FACTOR * theirs + 1e-6, (ours, theirs)


def plain_decode_attention(q, k, v, k_cache, v_cache, cache_lens, positions, rope_cos, rope_sin, scale):
    """decode_attention in plain PyTorch at q's dtype (RoPE, scores, softmax and the weighted sum
    all in that dtype), on copies: the yardstick of within_plain_torch_error."""
    B, Hq, D = q.shape
    group = Hq // k.shape[1]
    out = torch.empty_like(q)

    def rotate(x, c, s):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)

    for b in range(B):
        n, p = int(cache_lens[b]), int(positions[b])
        c, s = rope_cos[p].to(q.dtype), rope_sin[p].to(q.dtype)
        keys = torch.cat([k_cache[b, :, :n], rotate(k[b], c, s).unsqueeze(1)], 1).repeat_interleave(group, 0)
        vals = torch.cat([v_cache[b, :, :n], v[b].unsqueeze(1)], 1).repeat_interleave(group, 0)
        scores = (keys @ rotate(q[b], c, s).unsqueeze(-1)).squeeze(-1) * scale
        out[b] = (scores.softmax(-1).unsqueeze(1) @ vals).squeeze(1)
    return out


def rand(*shape, dtype=torch.float32, device="cpu", scale=1.0, g=None):
    return (torch.randn(*shape, generator=g) * scale).to(dtype=dtype, device=device)


# ------------------------------------------------------------------------------ builders


def attention_case(B, Hq, Hkv, D, S, lens, dtype, device="cpu", seed=0, spare_slots=0, cache_offset=0,
                   position_offsets=None):
    """q, k, v (strided slices of one fused QKV projection, as in the decoder), caches of
    B + spare_slots rows (cache_offset elements into their buffers: misaligned for vector loads),
    lengths, positions (lens + position_offsets, default 7), RoPE tables."""
    g = torch.Generator().manual_seed(seed)
    qkv = rand(B, (Hq + 2 * Hkv) * D, dtype=dtype, device=device, g=g)
    q = qkv[:, : Hq * D].view(B, Hq, D)
    k = qkv[:, Hq * D:(Hq + Hkv) * D].view(B, Hkv, D)
    v = qkv[:, (Hq + Hkv) * D:].view(B, Hkv, D)
    rows = B + spare_slots
    n = rows * Hkv * S * D

    def cache():
        return rand(n + cache_offset, dtype=dtype, device=device, g=g)[cache_offset:].view(rows, Hkv, S, D)

    kc, vc = cache(), cache()
    cos, sin = reference.rope_tables(D, 2 * S, 10000.0)
    lens = torch.tensor(lens, dtype=torch.long, device=device)
    offsets = torch.full((B,), 7) if position_offsets is None else torch.tensor(position_offsets)
    return q, k, v, kc, vc, lens, lens + offsets.to(device), cos.to(device), sin.to(device)


def _splice(B, T, H, fixed=False, seed=0):
    def build(device, dtype):
        g = torch.Generator().manual_seed(seed)
        V, slot = 50, 49
        if fixed:
            ids = torch.randint(0, V - 1, (B, T), generator=g)
            ids[:, 2:5] = slot
            ids[B - 1, T - 1] = slot
        else:
            ids = torch.randint(0, V - 1, (B, T), generator=g)
            ids[torch.rand(B, T, generator=g) < 0.4] = slot
        n = int((ids == slot).sum())
        table, values = rand(V, H, dtype=dtype, device=device, g=g), rand(n, H, dtype=dtype, device=device, g=g)
        return ids.to(device), table, values, slot
    return build


def _splice_no_slots(device, dtype):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 6, (2, 3), generator=g).to(device)
    table = rand(6, 5, dtype=dtype, device=device, g=g)
    return ids, table, table.new_empty(0, 5), -1


def _attention(B, Hq, Hkv, D, S, lens, **kw):
    def build(device, dtype):
        return attention_case(B, Hq, Hkv, D, S, lens, dtype, device, **kw)
    return build


def _head(B, H, Dout, up, hidden_scale=1.0, w_scale=None, seed=0):
    def build(device, dtype):
        g = torch.Generator().manual_seed(seed)
        hidden = rand(B, H, dtype=dtype, device=device, scale=hidden_scale, g=g)
        norm_w = (1 + 0.2 * torch.randn(H, generator=g)).to(dtype=dtype, device=device)
        head = rand(Dout, H, dtype=dtype, device=device, scale=w_scale or H ** -0.5, g=g)
        up_w = rand(H, Dout, dtype=dtype, device=device, scale=w_scale or Dout ** -0.5, g=g) if up else None
        return hidden, norm_w, 1e-6, head, up_w
    return build


def _gemv(B, K, N, seed=0):
    def build(device, dtype):
        g = torch.Generator().manual_seed(seed)
        return rand(B, K, dtype=dtype, device=device, g=g), rand(N, K, dtype=dtype, device=device, scale=K ** -0.5, g=g)
    return build


def _norm_gemv(B, K, N, seed=0, x_stride=None):
    """x (a strided slice of a wider buffer when x_stride is given), norm weight, eps, weight."""
    def build(device, dtype):
        g = torch.Generator().manual_seed(seed)
        x = rand(B, x_stride or K, dtype=dtype, device=device, scale=2, g=g)[:, :K]
        norm_w = (1 + 0.2 * torch.randn(K, generator=g)).to(dtype=dtype, device=device)
        return x, norm_w, 1e-6, rand(N, K, dtype=dtype, device=device, scale=K ** -0.5, g=g)
    return build


def _gemv_add(B, K, N, seed=0):
    def build(device, dtype):
        x, w = _gemv(B, K, N, seed)(device, dtype)
        return x, w, rand(B, N, dtype=dtype, device=device, g=torch.Generator().manual_seed(seed + 100))
    return build


def _norm_gemv_silu(B, K, I, seed=0, x_stride=None, extreme=False):
    """norm_gemv's arguments with [gate rows; up rows] weights [2I, K]; with extreme, every other
    gate row scaled so far that exp(-gate) leaves float's range (silu(-big) is -0)."""
    def build(device, dtype):
        x, norm_w, eps, w = _norm_gemv(B, K, 2 * I, seed, x_stride)(device, dtype)
        if extreme:
            big = 200 if dtype == torch.float16 else 1e30  # float16: gates up to ~1e3, still past exp's range
            w = w.clone()
            w[:I:2] = (w[:I:2].float() * big * K ** 0.5).to(dtype)
        return x, norm_w, eps, w
    return build


def _norm(B, H, eps=1e-6, residual=False, seed=0):
    def build(device, dtype):
        g = torch.Generator().manual_seed(seed)
        x = rand(B, H, dtype=dtype, device=device, scale=2, g=g)
        r = rand(B, H, dtype=dtype, device=device, g=g)
        w = (1 + 0.2 * torch.randn(H, generator=g)).to(dtype=dtype, device=device)
        return (x, r, w, eps) if residual else (x, w, eps)
    return build


def _silu(B, I, seed=0):
    def build(device, dtype):
        return (rand(B, 2 * I, dtype=dtype, device=device, scale=2, g=torch.Generator().manual_seed(seed)),)
    return build


def _silu_extremes(device, dtype):
    """Gates where exp(-|g|) leaves float's normal range (silu(-1e30) is -0 in torch, so
    silu(-1e30) * -1e30 is 0, not 1.6e22), next to ordinary ones."""
    big = 6e4 if dtype == torch.float16 else 1e30  # float16 tops out at 65504
    gate = [-big, -big, -1e4, -200.0, -100.0, -88.0, -87.5, -87.0, -86.0, -20.0, -1.0, 0.0, 1.0, 20.0, 1e4, big]
    up = [-big, big, big, -big, -big, big, big, big, big, 3.0, 2.0, big, -2.0, 1.0, 0.5, 1.0]
    return (torch.tensor([gate + up], dtype=torch.float32).to(dtype=dtype, device=device),)


# ------------------------------------------------------------------------------ the samples


@dataclasses.dataclass
class Sample:
    op: str
    name: str
    build: Callable  # (device, dtype) -> the op's arguments
    cuda: bool = True        # within what the CUDA kernels take (op_limits.h)
    emulate: bool = True     # run on the emulator too (False: too slow there, GPU and CPU only)
    gpu_fp32_tol: Optional[tuple] = None
    opcheck: bool = False    # the op's sample for torch.library.opcheck

    def __str__(self):
        return f"{self.op}-{self.name}"


_GPU = dict(gpu_fp32_tol=GPU_FP32_TOL)

SAMPLES = [
    # splice_embeddings: a copy, exact.
    Sample("splice_embeddings", "1x1x8", _splice(1, 1, 8)),
    Sample("splice_embeddings", "2x7x33", _splice(2, 7, 33), opcheck=True),
    Sample("splice_embeddings", "3x16x64", _splice(3, 16, 64)),
    Sample("splice_embeddings", "3x9x33-runs", _splice(3, 9, 33, fixed=True)),
    Sample("splice_embeddings", "no-slots", _splice_no_slots),
    # decode_attention (B, Hq, Hkv, D, S, lens)
    Sample("decode_attention", "empty-cache-d16", _attention(1, 4, 4, 16, 8, [0], spare_slots=1), cuda=False),
    Sample("decode_attention", "last-slot-d64", _attention(1, 2, 2, 64, 40, [39], spare_slots=1)),
    Sample("decode_attention", "gqa-ragged-d32", _attention(3, 6, 2, 32, 33, [5, 0, 17], spare_slots=1,
                                                             position_offsets=[0, 3, 6]), cuda=False),
    Sample("decode_attention", "mqa-d128", _attention(2, 8, 1, 128, 20, [11, 3], spare_slots=1,
                                                        position_offsets=[0, 3])),
    # head dims 48 and 80: the CPU's AVX2 loops take 16 dims a step, the weighted sum up to 64 at
    # a time (48: three steps, 80: 64 then 16); lengths off a multiple of the 4 keys scored at once
    Sample("decode_attention", "gqa-d48-long", _attention(2, 4, 2, 48, 70, [69, 13], spare_slots=1), cuda=False),
    Sample("decode_attention", "d80", _attention(1, 2, 1, 80, 12, [9], spare_slots=1), cuda=False),
    Sample("decode_attention", "odd-heads-d10", _attention(4, 3, 3, 10, 9, [1, 2, 8, 4], spare_slots=1), cuda=False),
    Sample("decode_attention", "gqa-d8", _attention(2, 4, 2, 8, 6, [1, 2], spare_slots=1), cuda=False, opcheck=True),
    Sample("decode_attention", "d64-opcheck", _attention(2, 4, 4, 64, 16, [3, 0]), opcheck=True, **_GPU),
    Sample("decode_attention", "empty-cache-d64", _attention(1, 4, 4, 64, 8, [0]), **_GPU),
    Sample("decode_attention", "emu1-heads-27-splits", _attention(1, 40, 40, 128, 2048, [1700]), **_GPU),
    Sample("decode_attention", "gqa-ragged-d128", _attention(3, 8, 2, 128, 300, [5, 0, 299]), **_GPU),
    Sample("decode_attention", "ragged-d64", _attention(5, 6, 6, 64, 77, [76, 1, 30, 64, 2]), **_GPU),
    # groups between the kernel's instances (1, 2, 4, 8): 3 runs on the 4-wide one, 7 on the 8
    Sample("decode_attention", "group-3-d64", _attention(2, 6, 2, 64, 70, [69, 10]), **_GPU),
    Sample("decode_attention", "group-7-d128", _attention(1, 7, 1, 128, 50, [40]), **_GPU),
    Sample("decode_attention", "group-8-64-splits", _attention(2, 32, 4, 64, 4096, [4000, 3]), **_GPU),
    # regression_head (B, H, Dout, up)
    Sample("regression_head", "emu1-64", _head(1, 64, 64, False, hidden_scale=3, w_scale=0.1)),
    Sample("regression_head", "odd-33-17", _head(3, 33, 17, True, hidden_scale=3, w_scale=0.1), opcheck=True),
    Sample("regression_head", "no-up", _head(2, 8, 5, False), opcheck=True),
    Sample("regression_head", "5-128-40", _head(5, 128, 40, True, hidden_scale=3, w_scale=0.1)),
    Sample("regression_head", "1x5120x1000", _head(1, 5120, 1000, True, seed=1), **_GPU),
    Sample("regression_head", "2x4096x300", _head(2, 4096, 300, True, seed=2), **_GPU),
    Sample("regression_head", "3x520x33", _head(3, 520, 33, True, seed=3), **_GPU),
    Sample("regression_head", "5x100x7", _head(5, 100, 7, True, seed=5), **_GPU),
    Sample("regression_head", "8x33x17", _head(8, 33, 17, True, seed=8), **_GPU),
    Sample("regression_head", "9x256x300-gemm", _head(9, 256, 300, True, seed=9), **_GPU),
    Sample("regression_head", "1x5120x5120", _head(1, 5120, 5120, True), emulate=False, **_GPU),
    Sample("regression_head", "3x4096x1000", _head(3, 4096, 1000, True), emulate=False, **_GPU),
    Sample("regression_head", "8x520x33", _head(8, 520, 33, True), **_GPU),
    Sample("regression_head", "2x100x7", _head(2, 100, 7, True), **_GPU),
    Sample("regression_head", "3x544x40-mma", _head(3, 544, 40, True, seed=15), **_GPU),
    Sample("regression_head", "11x256x20-mma", _head(11, 256, 20, True, seed=16), **_GPU),
    # gemv (B, K, N)
    Sample("gemv", "1x1x1", _gemv(1, 1, 1)),
    Sample("gemv", "1x512x512", _gemv(1, 512, 512)),
    Sample("gemv", "2x31x65", _gemv(2, 31, 65)),
    Sample("gemv", "7x100x3", _gemv(7, 100, 3)),
    Sample("gemv", "16x257x129-gemm", _gemv(16, 257, 129)),
    Sample("gemv", "2x8x3", _gemv(2, 8, 3), opcheck=True),
    # the GPU's sizes, then every exact-batch instance (1..8) through both its multi-vector loop
    # and its tail: K of several 256-element strides plus a remainder (a lane's vectors in
    # flight, then the rest)
    *[Sample("gemv", f"{B}x{K}x{N}", _gemv(B, K, N, seed=B), **_GPU)
      for B, K, N in [(1, 5120, 1000), (2, 4096, 300), (3, 520, 33), (5, 100, 7), (8, 33, 17),
                      (4, 1288, 40), (6, 1800, 24), (8, 2056, 20)]],
    # the tensor-core kernel (16-bit types, K a multiple of 32, batch up to 16): rows not a
    # multiple of 16, fewer chunks than warps, chunks in flight plus a tail, two batch tiles
    *[Sample("gemv", f"{B}x{K}x{N}-mma", _gemv(B, K, N, seed=seed), **_GPU)
      for seed, (B, K, N) in enumerate([(5, 96, 37), (1, 2080, 33), (12, 1056, 50), (16, 320, 17)], start=11)],
    Sample("gemv", "9x256x300-gemm", _gemv(9, 256, 300, seed=9), **_GPU),
    # on the GPU and the CPU, not the emulator
    *[Sample("gemv", f"{B}x{K}x{N}", _gemv(B, K, N), emulate=False, **_GPU)
      for B, K, N in [(1, 5120, 5120), (3, 4096, 1000), (8, 520, 33), (2, 100, 7)]],
    # norm_gemv, gemv_add (B, K, N): odd sizes, every CUDA-core batch instance (1..8) and the
    # GEMM past it, K unaligned for 16-byte vectors and aligned, and the tensor-core kernel
    # (16-bit types, K a multiple of 32, batch up to 16, one and two batch tiles)
    *[Sample(op, f"{B}x{K}x{N}", build(B, K, N, seed=B), opcheck=(B, K, N) == (2, 8, 3))
      for op, build in [("norm_gemv", _norm_gemv), ("gemv_add", _gemv_add)]
      for B, K, N in [(1, 1, 1), (2, 8, 3), (3, 33, 17), (4, 1288, 40), (7, 100, 3), (8, 520, 33),
                      (16, 257, 129), (9, 256, 30)]],
    *[Sample(op, f"{B}x{K}x{N}-mma", build(B, K, N, seed=B), **_GPU)
      for op, build in [("norm_gemv", _norm_gemv), ("gemv_add", _gemv_add)]
      for B, K, N in [(1, 2080, 33), (5, 96, 37), (12, 1056, 50), (16, 320, 17)]],
    Sample("norm_gemv", "3x64x20-strided-x", _norm_gemv(3, 64, 20, seed=3, x_stride=72), **_GPU),
    Sample("norm_gemv", "17x64x20-strided-gemm", _norm_gemv(17, 64, 20, seed=17, x_stride=72), **_GPU),
    Sample("gemv_add", "1x5120x1000", _gemv_add(1, 5120, 1000, seed=1), emulate=False, **_GPU),
    Sample("norm_gemv", "1x5120x1000", _norm_gemv(1, 5120, 1000, seed=1), emulate=False, **_GPU),
    # norm_gemv_silu (B, K, I; weights [2I, K]): odd sizes, batches 1..16 and the GEMM past them,
    # the tensor-core kernel with SiLU * mul in its epilogue (16-bit types, K a multiple of 32,
    # I a multiple of 8, one and two batch tiles), I not a multiple of 8 there (the two-kernel
    # composition), strided x, gates whose SiLU underflows
    *[Sample("norm_gemv_silu", f"{B}x{K}x{I}", _norm_gemv_silu(B, K, I, seed=B), opcheck=(B, K, I) == (2, 8, 3))
      for B, K, I in [(1, 1, 1), (2, 8, 3), (3, 33, 17), (4, 1288, 20), (7, 100, 3), (8, 520, 16),
                      (16, 257, 65), (9, 256, 15), (17, 64, 12)]],
    *[Sample("norm_gemv_silu", f"{B}x{K}x{I}-mma", _norm_gemv_silu(B, K, I, seed=B), **_GPU)
      for B, K, I in [(1, 2080, 32), (5, 96, 40), (8, 64, 8), (9, 128, 24), (12, 1056, 24), (16, 320, 8),
                      (3, 64, 13), (2, 96, 20)]],
    Sample("norm_gemv_silu", "3x64x16-strided-x", _norm_gemv_silu(3, 64, 16, seed=3, x_stride=72), **_GPU),
    Sample("norm_gemv_silu", "17x64x16-strided-gemm", _norm_gemv_silu(17, 64, 16, seed=17, x_stride=72), **_GPU),
    *[Sample("norm_gemv_silu", f"{B}x{K}x{I}-extremes", _norm_gemv_silu(B, K, I, seed=B, extreme=True), **_GPU)
      for B, K, I in [(2, 64, 16), (3, 40, 5)]],
    Sample("norm_gemv_silu", "1x5120x1376", _norm_gemv_silu(1, 5120, 1376, seed=1), emulate=False, **_GPU),
    # rms_norm, add_rms_norm (B, H), silu_mul (B, I)
    *[Sample("rms_norm", f"{B}x{H}", _norm(B, H, seed=H), opcheck=(B, H) == (2, 8))
      for B, H in [(1, 8), (3, 33), (2, 512), (1, 1), (2, 8)]],
    Sample("rms_norm", "3x5120", _norm(3, 5120), **_GPU),
    # rows kept in registers up to 256 threads x 32 = 8192 wide; wider ones take the other path
    *[Sample("rms_norm", f"2x{H}-row-path", _norm(2, H, seed=H), **_GPU) for H in (8192, 8193)],
    *[Sample("add_rms_norm", f"{B}x{H}", _norm(B, H, eps=1e-5, residual=True, seed=H), opcheck=(B, H) == (2, 8))
      for B, H in [(1, 8), (3, 33), (2, 512), (1, 1), (2, 8)]],
    Sample("add_rms_norm", "3x5120", _norm(3, 5120, residual=True), **_GPU),
    *[Sample("add_rms_norm", f"2x{H}-row-path", _norm(2, H, residual=True, seed=H), **_GPU) for H in (8192, 8193)],
    *[Sample("silu_mul", f"{B}x{I}", _silu(B, I, seed=I), opcheck=(B, I) == (2, 4))
      for B, I in [(1, 8), (3, 33), (2, 512), (1, 1), (2, 4)]],
    Sample("silu_mul", "extremes", _silu_extremes),
    Sample("silu_mul", "3x1377", _silu(3, 1377), **_GPU),
    Sample("silu_mul", "2x600000-grid-stride", _silu(2, 600_000), **_GPU),
]

OPS = sorted({s.op for s in SAMPLES})


def samples(cuda=False, emulate=False):
    return [s for s in SAMPLES if (not cuda or s.cuda) and (not emulate or s.emulate)]


def opcheck_samples(device):
    """(op, args) for torch.library.opcheck: each op's opcheck samples that the device takes,
    float32, every tensor contiguous."""
    for s in SAMPLES:
        if s.opcheck and (device == "cpu" or s.cuda):
            args = tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in s.build(device, torch.float32))
            if s.op == "decode_attention":  # the schema's scale (the Python wrapper defaults it)
                args = (*args, args[0].shape[-1] ** -0.5)
                yield s.op, args
                # and with the split counters the decoder passes (int32 zeros, one per row and KV head)
                counters = torch.zeros(args[0].shape[0] * args[3].shape[1], dtype=torch.int32, device=device)
                yield s.op, (*args, counters)
                continue
            yield s.op, args


# ------------------------------------------------------------------------------ the checks


def _clone(args):
    return [a.clone() if isinstance(a, torch.Tensor) else a for a in args]


def check(sample: Sample, fn, args, dtype, gpu=False):
    """Runs fn (the op, on whichever backend) on args and asserts what the op promises against
    emu_fast.reference (which runs on clones of the inputs it mutates)."""
    tol = sample.gpu_fp32_tol if gpu and dtype == torch.float32 and sample.gpu_fp32_tol else TOL[dtype]
    op = sample.op
    if op == "splice_embeddings":
        out = fn(*args)
        assert out.dtype == dtype and out.shape == (*args[0].shape, args[1].shape[1])
        torch.testing.assert_close(out, reference.splice_embeddings(*args), rtol=0, atol=0)
    elif op == "decode_attention":
        q, k, v, kc, vc, cl, pos, cos, sin = args
        kc_ref, vc_ref = kc.clone(), vc.clone()
        expected = reference.decode_attention(q, k, v, kc_ref, vc_ref, cl, pos, cos, sin, q.shape[-1] ** -0.5)
        kc32, vc32 = kc.float(), vc.float()
        expected32 = reference.decode_attention(q.float(), k.float(), v.float(), kc32, vc32, cl, pos, cos, sin,
                                                q.shape[-1] ** -0.5)
        plain = plain_decode_attention(q, k, v, kc, vc, cl, pos, cos, sin, q.shape[-1] ** -0.5)
        out = fn(q, k, v, kc, vc, cl, pos, cos, sin)
        assert out.shape == q.shape and out.dtype == dtype
        close(out, expected, dtype, tol)
        within_plain_torch_error(out, expected32, plain)
        close(kc, kc_ref, dtype, tol)
        torch.testing.assert_close(vc, vc_ref, rtol=0, atol=0)  # values are copied
        # With split counters (as the decoder calls it) the CUDA kernel's last split merges the
        # partial results itself: the same merge in the same order, so bitwise the same output
        # (appending the same k and v again changes nothing); the counters come back zero.
        counters = torch.zeros(q.shape[0] * kc.shape[1], dtype=torch.int32, device=q.device)
        torch.testing.assert_close(fn(q, k, v, kc, vc, cl, pos, cos, sin, split_counters=counters), out, rtol=0, atol=0)
        assert not counters.any()
    elif op == "regression_head":
        hidden, norm_w, eps, head, up = args
        out, nxt = fn(*args)
        close(out, reference.regression_head(*_clone(args))[0], dtype, tol)
        assert nxt.shape == ((hidden.shape[0], hidden.shape[1]) if up is not None else (hidden.shape[0], 0))
        if up is not None:  # our own output into the reference up-projection: tests the GEMV, not rounding
            close(nxt, reference.gemv(out, up), dtype, tol)
    elif op == "gemv":
        x, w = args
        out = fn(x, w)
        expected = reference.gemv(x, w)
        close(out, expected, dtype, tol)
        within_plain_torch_error(out, x.float() @ w.float().t(), x @ w.t())
    elif op == "norm_gemv":
        close(fn(*args), reference.norm_gemv(*args), dtype, tol)
    elif op == "gemv_add":
        close(fn(*args), reference.gemv_add(*args), dtype, tol)
    elif op == "norm_gemv_silu":
        out = fn(*args)
        assert out.shape == (args[0].shape[0], args[3].shape[0] // 2) and out.dtype == dtype
        close(out, reference.norm_gemv_silu(*args), dtype, tol)
    elif op == "rms_norm":
        close(fn(*args), reference.rms_norm(*args), dtype, tol)
    elif op == "add_rms_norm":
        normed, s = fn(*args)
        ref_normed, ref_s = reference.add_rms_norm(*args)
        close(normed, ref_normed, dtype, tol)
        torch.testing.assert_close(s, ref_s, rtol=0, atol=0)  # one rounding of x + residual
    elif op == "silu_mul":
        (gate_up,) = args
        out = fn(gate_up)
        close(out, reference.silu_mul(gate_up), dtype, tol)
        within_plain_torch_error(out, reference.silu_mul(gate_up.float()), reference.silu_mul(gate_up))
    else:  # pragma: no cover
        raise KeyError(op)
