"""The CUDA kernels of csrc/kernels/cuda/, run on the CPU by the emulator in tests/cuda_emulation/
(see its README). `load()` compiles them with g++ once per source change (a few seconds) and
returns wrappers with the same arguments and results as the emu_fast CUDA ops, taking CPU
tensors. They unwrap tensors as csrc/ops/<op>.cu does and call the same host code
(tests/cuda_emulation/kernels.cpp): launch plans, size rules and compositions are not restated
here. The argument checks in front of them are the ones the CPU ops share and are tested there."""
import ctypes
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from helpers import ROOT, build_shared_library, compiler, sources_key  # noqa: F401  (compiler: for the tests)

EMULATION = ROOT / "tests/cuda_emulation"
SOURCES = [EMULATION / f for f in ("emulator.cpp", "kernels.cpp", "selftest.cpp")]
HEADERS = (sorted((EMULATION / "include").glob("*.h")) + sorted((ROOT / "csrc/kernels/cuda").glob("*.cuh"))
           + [ROOT / "csrc" / f for f in ("ops/limits.h", "ops/compose.h", "kernels/cpu/splice_embeddings.h")])
DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
H100_SMS = 132

_lib = None

# UndefinedBehaviorSanitizer catches misaligned vector loads (which fault on a GPU), signed
# overflow and the like; used wherever the compiler has it.
UBSAN_FLAGS = ["-fsanitize=undefined", "-fno-sanitize=vptr"]


SHARED_DECL = re.compile(r"__shared__\s+([\w:]+)\s+(\w+)\s*((?:\[[^\]]+\])*)\s*;")


def _rewrite_shared(src: Path, dst: Path):
    """Copies src to dst with each `__shared__ T name[N]...;` made a reference to
    emulation::shared_array<T[N]...> (poisoned per block, see include/emulator.h)."""
    text = SHARED_DECL.sub(r"auto& \2 = ::emu_fast::emulation::shared_array<\1\3>([] {});", src.read_text())
    if "__shared__" in text:
        raise RuntimeError(f"{src}: a __shared__ declaration the emulator cannot rewrite (one name per line)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(text)


def _build() -> Path:
    key = sources_key([Path(__file__), *SOURCES, *HEADERS])
    out = ROOT / "build/cuda-emulation" / f"libemu_cuda_{key}.so"
    if not out.exists():
        gen = ROOT / "build/cuda-emulation" / f"src_{key}_{os.getpid()}"
        for header in (ROOT / "csrc/kernels/cuda").glob("*.cuh"):
            _rewrite_shared(header, gen / "kernels/cuda" / header.name)
        _rewrite_shared(EMULATION / "selftest.cpp", gen / "selftest.cpp")
        sources = [EMULATION / "emulator.cpp", EMULATION / "kernels.cpp", gen / "selftest.cpp"]
        build_shared_library([compiler(), "-std=c++20", "-O1", "-g", "-fPIC", "-shared", "-Wall", "-Wno-unknown-pragmas",
                              "-Wno-unused-parameter", "-U_FORTIFY_SOURCE", f"-I{EMULATION / 'include'}", f"-I{gen}",
                              f"-I{ROOT / 'csrc'}", *map(str, sources)], out, UBSAN_FLAGS)
        shutil.rmtree(gen)
    return out


def load():
    global _lib
    if _lib is None:
        lib = ctypes.CDLL(str(_build()))
        lib.emu_last_error.restype = ctypes.c_char_p
        lib.emu_decode_attention_workspace_floats.restype = ctypes.c_int64
        lib.emu_regression_head_workspace_elems.restype = ctypes.c_int64
        lib.emu_gemv_workspace_elems.restype = ctypes.c_int64
        lib.emu_norm_gemv_silu_workspace_elems.restype = ctypes.c_int64
        _lib = lib
    return _lib


def _call(what, fn, *args):
    """Runs the C entry point fn with stderr (fd 2) captured, where UBSan writes its reports;
    raises CudaError for a failed launch or a report. UBSan reports each place once a process."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as err:
        os.dup2(err.fileno(), 2)
        try:
            rc = getattr(load(), fn)(*args)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        err.seek(0)
        reports = err.read().decode(errors="replace")
    if rc != 0:
        raise CudaError(f"{what}: CUDA error {rc}: {load().emu_last_error().decode()}")
    if "runtime error" in reports:
        raise CudaError(f"{what}: undefined behaviour in a kernel:\n{reports}")


class CudaError(RuntimeError):
    pass


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr() if t is not None and t.numel() else None)


class _RedZones:
    """A stand-in for compute-sanitizer's memcheck: every tensor a kernel gets is moved into a
    buffer with 4 KiB of poison on each side, at the same address modulo 64 so that
    alignment-dependent paths do not change; the gaps of a strided view are poisoned too. The
    poison is a signalling NaN in each float type (any arithmetic on it gives a different,
    quiet NaN) and a negative number in int64 (an invalid length or index), so a read past a
    tensor spoils the result (unless only compared: NaN fails every comparison), and check()
    finds any write outside the tensor's own elements. Accesses further out than the margin
    land in unrelated memory (or fault, which the emulator reports)."""

    MARGIN = 4096
    POISON = {torch.float32: (torch.int32, -0x005A5A5B), torch.bfloat16: (torch.int16, -0x005B),
              torch.float16: (torch.int16, -0x025B), torch.int64: (torch.int64, -0x5A5A5A5A5A5A5A5B),
              torch.int32: (torch.int32, -0x5A5A5A5B), torch.uint8: (torch.uint8, 0xA5)}

    def __init__(self):
        self._zones = []

    def __call__(self, t):
        if t is None or t.numel() == 0:
            return t
        span = 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))  # elements the view can reach
        size = t.element_size()
        as_int, poison = self.POISON[t.dtype]
        buf = torch.full(((span * size + 2 * self.MARGIN + 64) // size,), poison, dtype=as_int)
        start = (self.MARGIN + (t.data_ptr() - buf.data_ptr() - self.MARGIN) % 64) // size  # in elements
        guarded = buf.view(t.dtype)[start:start + span].as_strided(t.shape, t.stride())
        guarded.copy_(t)
        outside = torch.ones(buf.numel(), dtype=torch.bool)  # elements the kernel must not write
        outside[start:start + span].as_strided(t.shape, t.stride()).fill_(False)
        self._zones.append((t, guarded, buf, outside, buf[outside].clone()))
        return guarded

    def check(self, what):
        for original, guarded, buf, outside, before in self._zones:
            if not torch.equal(buf[outside], before):
                raise CudaError(f"{what}: out-of-bounds write next to a {tuple(original.shape)} {original.dtype} argument")
            original.copy_(guarded)  # results, and in-place updates such as the KV cache


def has_ubsan() -> bool:
    return hasattr(load(), "__ubsan_handle_type_mismatch_v1")


def set_schedule_seed(seed: int):
    load().emu_set_schedule_seed(ctypes.c_uint64(seed))


def last_launch_waits() -> int:
    """Threads of the last launch that called griddepcontrol.wait (wait_for_prior_grid)."""
    lib = load()
    lib.emu_last_launch_waits.restype = ctypes.c_int64
    return lib.emu_last_launch_waits()


def selftest(which: str, x: torch.Tensor, blocks: int, threads: int) -> torch.Tensor:
    """Runs one of the kernels in tests/cuda_emulation/selftest.cpp on float32 x."""
    code = ["warp_sums", "barrier_after_return", "shuffle_missing_a_lane", "racy_shared_write",
            "write_past_the_end", "misaligned_vector_load", "read_unwritten_shared", "shuffle_partial_mask",
            "null_dereference", "shuffle_width_8", "pdl_copy", "pdl_exit_without_wait", "pdl_trigger_before_wait",
            "plain_launch_exit_without_wait"].index(which)
    outputs_per_thread = 2 if which == "shuffle_width_8" else 1
    out = torch.full((max(outputs_per_thread * blocks * threads, 1),), float("nan"))
    z = _RedZones()
    _call(which, "emu_selftest", code, _ptr(z(x)), _ptr(z(out)), blocks, threads)
    z.check(which)
    return out


def _gemv(op, x, w, norm_weight=None, eps=0.0, residual=None):
    """cuda::launch_gemv as csrc/ops/<op>.cu's gemv_impl runs it: the tensor-core or CUDA-core
    kernel up to batch 16 / 8 and a GEMM above (here a plain loop where the op calls cuBLAS),
    the norm in the prologue with norm_weight, the residual in the epilogue with residual."""
    x = x if x.stride(1) == 1 else x.contiguous()
    B, K = x.shape
    N = w.shape[0]
    if residual is not None and residual.stride(1) != 1:
        residual = residual.contiguous()
    y = torch.empty(B, N, dtype=x.dtype)
    ldx = ctypes.c_int64(x.stride(0))
    workspace = torch.empty(load().emu_gemv_workspace_elems(ctypes.c_int64(B), ctypes.c_int64(K), ldx,
                                                            int(norm_weight is not None)), dtype=x.dtype)
    z = _RedZones()
    _call(op, "emu_gemv", DTYPE_CODE[x.dtype], _ptr(z(w)), _ptr(z(x)), _ptr(z(y)), ctypes.c_int64(B),
          ctypes.c_int64(K), ctypes.c_int64(N), ldx, _ptr(z(norm_weight)), ctypes.c_float(eps), _ptr(z(residual)),
          ctypes.c_int64(residual.stride(0) if residual is not None else 0), _ptr(z(workspace)))
    z.check(op)
    return y


def gemv(x, w):
    return _gemv("gemv", x, w)


def _quantized_rows(x, int4):
    """x as csrc/ops/quantized_gemv.cu's kernel_rows gives it to the kernel: in place when its
    rows are 16-byte aligned and hold whole vectors, else a fresh dense copy (int4: zero-padded to
    whole 32-value blocks; int8 with K % 16 != 0: as it is, for the scalar loop)."""
    B, K = x.shape
    rows_ok = x.stride(1) == 1 and (B <= 1 or x.stride(0) >= K)
    ld = max(K, 1) if B <= 1 else x.stride(0)
    vectors_ok = (rows_ok and x.data_ptr() % 16 == 0 and (ld * x.element_size()) % 16 == 0
                  and K % (32 if int4 else 16) == 0)
    if vectors_ok:
        return x, ld
    if not int4:
        y = x if rows_ok and K % 16 != 0 else x.clone(memory_format=torch.contiguous_format)
        return y, (max(K, 1) if B <= 1 else y.stride(0))
    padded = -(-K // 32) * 32
    rows = torch.zeros(B, padded, dtype=x.dtype)
    rows[:, :K] = x
    return rows, padded


def _quantized_gemv(what, x, qweight, scales, group):
    B, K = x.shape
    N = qweight.shape[0]
    out = torch.empty(B, N, dtype=x.dtype)
    if B == 0 or N == 0:
        return out
    xk, ldx = _quantized_rows(x, group > 0)
    z = _RedZones()
    _call(what, "emu_quantized_gemv", DTYPE_CODE[x.dtype], _ptr(z(qweight.view(torch.uint8))), _ptr(z(scales)),
          ctypes.c_int64(scales.shape[1] if scales.dim() == 2 else 1), group, _ptr(z(xk)), ctypes.c_int64(ldx),
          _ptr(z(out)), ctypes.c_int64(B), K, N)
    z.check(what)
    return out


def gemv_int8(x, qweight, scales):
    return _quantized_gemv("gemv_int8", x, qweight, scales, 0)


def gemv_int4(x, qweight, scales, group_size):
    return _quantized_gemv("gemv_int4", x, qweight, scales, group_size)


def norm_gemv(x, norm_weight, eps, weight):
    return _gemv("norm_gemv", x, weight, norm_weight=norm_weight, eps=eps)


def gemv_add(x, weight, residual):
    return _gemv("gemv_add", x, weight, residual=residual)


def norm_gemv_silu(x, norm_weight, eps, gate_up_weight):
    """cuda::launch_norm_gemv_silu as the CUDA op runs it: the tensor-core kernel with SiLU * mul
    in its epilogue where it takes the call (I % 8 == 0), else norm_gemv then silu_mul."""
    x = x if x.stride(1) == 1 else x.contiguous()
    B, K = x.shape
    I = gate_up_weight.shape[0] // 2
    y = torch.empty(B, I, dtype=x.dtype)
    ldx = ctypes.c_int64(x.stride(0))
    workspace = torch.empty(load().emu_norm_gemv_silu_workspace_elems(ctypes.c_int64(B), ctypes.c_int64(K), ldx,
                                                                      ctypes.c_int64(I)), dtype=x.dtype)
    z = _RedZones()
    _call("norm_gemv_silu", "emu_norm_gemv_silu", DTYPE_CODE[x.dtype], _ptr(z(gate_up_weight)), _ptr(z(x)),
          _ptr(z(y)), _ptr(z(norm_weight)), ctypes.c_float(eps), ctypes.c_int64(B), ctypes.c_int64(K),
          ctypes.c_int64(I), ldx, _ptr(z(workspace)))
    z.check("norm_gemv_silu")
    return y


def regression_head(hidden, norm_weight, eps, head_weight, up_weight=None):
    """emu_fast::regression_head as the CUDA op runs it: compose::regression_head over the CUDA
    launchers (csrc/compose.h)."""
    hidden = hidden if hidden.stride(1) == 1 else hidden.contiguous()
    B, H = hidden.shape
    Dout = head_weight.shape[0]
    out = torch.empty(B, Dout, dtype=hidden.dtype)
    nxt = torch.empty(B, H if up_weight is not None else 0, dtype=hidden.dtype)
    ld = ctypes.c_int64(hidden.stride(0))
    workspace = torch.empty(load().emu_regression_head_workspace_elems(ctypes.c_int64(B), ctypes.c_int64(H), ld),
                            dtype=hidden.dtype)
    z = _RedZones()
    _call("regression_head", "emu_regression_head", DTYPE_CODE[hidden.dtype], _ptr(z(hidden)), ld,
          _ptr(z(norm_weight)), ctypes.c_float(eps), _ptr(z(head_weight)), _ptr(z(up_weight)), _ptr(z(out)),
          _ptr(z(nxt)), ctypes.c_int64(B), ctypes.c_int64(H), ctypes.c_int64(Dout), _ptr(z(workspace)))
    z.check("regression_head")
    return out, nxt


def decode_attention_splits(batch, num_kv_heads, capacity, sm_count=H100_SMS):
    return load().emu_decode_attention_splits(ctypes.c_int64(batch), ctypes.c_int64(num_kv_heads),
                                              ctypes.c_int64(capacity), sm_count)


def decode_attention(q, k, v, k_cache, v_cache, cache_lens, positions, rope_cos, rope_sin, scale=None,
                     split_counters=None, sm_count=H100_SMS):
    """With split_counters (int32, B * Hkv or more, zeros) the last split of each (sequence, KV head)
    merges the splits, as the decoder runs it; without, the combine kernel does."""
    B, Hq, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    scale = D ** -0.5 if scale is None else scale
    lib = load()
    workspace = torch.empty(lib.emu_decode_attention_workspace_floats(
        ctypes.c_int64(B), ctypes.c_int64(Hq), ctypes.c_int64(Hkv), ctypes.c_int64(S), D, sm_count), dtype=torch.float32)
    out = torch.empty(B, Hq, D, dtype=q.dtype)
    z = _RedZones()
    _call("decode_attention", "emu_decode_attention",
          DTYPE_CODE[q.dtype], D, B, _ptr(z(q)), _ptr(z(k)), _ptr(z(v)), ctypes.c_int64(q.stride(0)),
          ctypes.c_int64(k.stride(0)), ctypes.c_int64(v.stride(0)), _ptr(z(k_cache)), _ptr(z(v_cache)),
          _ptr(z(cache_lens)), _ptr(z(positions)), _ptr(z(rope_cos)), _ptr(z(rope_sin)),
          ctypes.c_int64(rope_cos.shape[0]), _ptr(z(out)), _ptr(z(workspace)), Hq, Hkv, S,
          ctypes.c_float(scale), sm_count, _ptr(z(split_counters)))
    z.check("decode_attention")
    return out


def _norm(x, residual, weight, eps):
    B, H = x.shape
    y = torch.empty_like(x)
    s = torch.empty_like(x) if residual is not None else None
    z = _RedZones()
    _call("rms_norm", "emu_rms_norm", DTYPE_CODE[x.dtype], _ptr(z(x)), _ptr(z(residual)), _ptr(z(weight)),
          ctypes.c_float(eps), ctypes.c_int64(B), H, _ptr(z(y)), _ptr(z(s)))
    z.check("rms_norm")
    return y, s


def rms_norm(x, weight, eps):
    return _norm(x.contiguous(), None, weight, eps)[0]


def add_rms_norm(x, residual, weight, eps):
    return _norm(x.contiguous(), residual.contiguous(), weight, eps)


def silu_mul(gate_up):
    gate_up = gate_up.contiguous()
    B, I = gate_up.shape[0], gate_up.shape[1] // 2
    y = torch.empty(B, I, dtype=gate_up.dtype)
    z = _RedZones()
    _call("silu_mul", "emu_silu_mul", DTYPE_CODE[gate_up.dtype], _ptr(z(gate_up)), ctypes.c_int64(B), I, _ptr(z(y)))
    z.check("silu_mul")
    return y


def splice_embeddings(ids, table, values, slot_id):
    """As the CUDA op: the ids checked and the slots numbered on the host (kernels::number_slots,
    shared with the CPU op), then one kernel copies."""
    ids = ids.contiguous()
    B, T = ids.shape
    values = values.contiguous()
    out = torch.empty(B, T, table.shape[1], dtype=table.dtype)
    slot_index = torch.empty(B * T, dtype=torch.int64)
    slots = ctypes.c_int64()
    z = _RedZones()
    _call("splice_embeddings", "emu_splice", DTYPE_CODE[table.dtype], _ptr(z(ids)), _ptr(z(slot_index)),
          _ptr(z(table)), ctypes.c_int64(table.shape[0]), _ptr(z(values)), ctypes.c_int64(slot_id),
          ctypes.c_int64(B * T), table.shape[1], _ptr(z(out)), ctypes.byref(slots))
    z.check("splice_embeddings")
    if slots.value < 0:
        p = -slots.value - 1
        raise IndexError(f"emu_fast.splice_embeddings: token id {int(ids.flatten()[p])} at (row {p // T}, position "
                         f"{p % T}) is outside the embedding table of {table.shape[0]} rows")
    if slots.value != values.shape[0]:
        raise ValueError(f"emu_fast.splice_embeddings: the input has {slots.value} slots (token id {slot_id}) but "
                         f"{values.shape[0]} slot vectors were given")
    return out
