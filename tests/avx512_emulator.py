"""The AVX-512 kernels of csrc/kernels/quantized_gemv_avx512.inc (int8 / int4 weights times int16
inputs, int4 weights times int8 inputs; AVX-512BW and VNNI copies), run on any processor:
`load()` compiles tests/avx512_emulation/kernels.cpp, which includes the real kernel file against
the portable intrinsics of tests/avx512_emulation/intrinsics.h, with g++ (and UBSan where it has
it) once per source change, and the wrappers below call it through ctypes. What this cannot test is each
intrinsic's mapping to its instruction (intrinsics.h follows Intel's pseudocode for each)."""
import ctypes
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
EMULATION = ROOT / "tests/avx512_emulation"
SOURCES = [EMULATION / "kernels.cpp", EMULATION / "intrinsics.h"] + [
    ROOT / "csrc/kernels" / f for f in ("quantized_gemv_avx512.inc", "quantized_gemv_int16.h", "quantized_gemv_int8_input.h",
                                        "quantized_row_blocks.h", "quantized_gemv.h", "gemv.h", "multiversion.h",
                                        "scalar.h")]
UBSAN_FLAGS = ["-fsanitize=undefined", "-fno-sanitize=vptr", "-fno-sanitize-recover=undefined"]

_lib = None


def _build() -> Path:
    digest = hashlib.sha256(Path(__file__).read_bytes())
    for f in SOURCES:
        digest.update(f.name.encode() + f.read_bytes())
    out = ROOT / "build/avx512-emulation" / f"libemu_avx512_{digest.hexdigest()[:16]}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
        cmd = [cxx, "-std=c++17", "-O1", "-g", "-fPIC", "-shared", "-Wall", f"-I{EMULATION}", f"-I{ROOT / 'csrc'}",
               str(EMULATION / "kernels.cpp"), "-o", str(tmp)]
        # UBSan: a signed overflow or an out-of-range shift in the kernels' arithmetic aborts
        if subprocess.run(cmd + UBSAN_FLAGS, capture_output=True).returncode != 0:
            subprocess.run(cmd, check=True)
        tmp.rename(out)
    return out


def load():
    global _lib
    if _lib is None:
        _lib = ctypes.CDLL(str(_build()))
    return _lib


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr())


def _i64(*v):
    return [ctypes.c_int64(int(a)) for a in v]


def gemv_int8(v, step, q, scales, vnni, n_begin=0, n_end=None):
    """y [B, N] (rows outside [n_begin, n_end) NaN) from int16 inputs v [B, blocks * 64] in natural
    order with steps [B, blocks], int8 weights q [N, K] and scales [N]."""
    N, K = q.shape
    n_end = N if n_end is None else n_end
    y = torch.full((v.shape[0], N), float("nan"))
    load().emu_avx512_int8_i16(ctypes.c_int(int(vnni)), _ptr(q.contiguous()), _ptr(scales.contiguous()),
                               _ptr(v.contiguous()), _ptr(step.contiguous()), _ptr(y),
                               *_i64(v.shape[0], K, N, n_begin, n_end))
    return y


def gemv_int4(v, step, q, scales, group, k_dim, vnni, n_begin=0, n_end=None):
    """The int4 product (packed q [N, padded K / 2], scales [N, groups]) with inputs as above."""
    N = q.shape[0]
    n_end = N if n_end is None else n_end
    y = torch.full((v.shape[0], N), float("nan"))
    load().emu_avx512_int4_i16(ctypes.c_int(int(vnni)), _ptr(q.contiguous()), _ptr(scales.contiguous()),
                               ctypes.c_int64(group), _ptr(v.contiguous()), _ptr(step.contiguous()), _ptr(y),
                               *_i64(v.shape[0], k_dim, N, n_begin, n_end))
    return y


def gemv_int4_int8_inputs(v, step, q, scales, group, k_dim, vnni, n_begin=0, n_end=None):
    """The int4 product with int8 inputs v [B, blocks * 128] (natural order), steps [B, blocks]."""
    N = q.shape[0]
    n_end = N if n_end is None else n_end
    y = torch.full((v.shape[0], N), float("nan"))
    load().emu_avx512_int4_i8(ctypes.c_int(int(vnni)), _ptr(q.contiguous()), _ptr(scales.contiguous()),
                              ctypes.c_int64(group), _ptr(v.contiguous()), _ptr(step.contiguous()), _ptr(y),
                              *_i64(v.shape[0], k_dim, N, n_begin, n_end))
    return y
