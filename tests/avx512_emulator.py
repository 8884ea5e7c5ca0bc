"""The AVX-512 kernels of csrc/kernels/quantized_gemv_avx512.inc (int8 / int4 weights times int16
inputs, int4 weights times int8 inputs; AVX-512BW and VNNI copies), run on any processor:
`load()` compiles tests/avx512_emulation/kernels.cpp, which includes the real kernel file against
the portable intrinsics of tests/avx512_emulation/intrinsics.h, with g++ (and UBSan where it has
it) once per source change, and the wrappers below call it through ctypes. The inputs are rounded and laid out
by the production code, compiled into the same library. What this cannot test is each
intrinsic's mapping to its instruction (intrinsics.h follows Intel's pseudocode for each)."""
import ctypes
import os  # noqa: F401  (tests/emulators/test_avx512_emulation.py asks emu.os and emu.shutil for a compiler)
import shutil  # noqa: F401
from pathlib import Path

import torch

from helpers import ROOT, build_shared_library, compiler, sources_key

EMULATION = ROOT / "tests/avx512_emulation"
KERNELS = ROOT / "csrc/kernels/cpu"
# The production rounding and layouts (and, to link them, the real AVX-512 copies, never called
# here), compiled beside the emulated kernels.
PRODUCTION = [KERNELS / f for f in ("quantized_inputs.cpp", "quantized_gemv_avx512.cpp")]
SOURCES = [EMULATION / "kernels.cpp", EMULATION / "intrinsics.h", *PRODUCTION, *sorted(KERNELS.glob("*.h")),
           *sorted(KERNELS.glob("*.inc"))]
# UBSan: a signed overflow or an out-of-range shift in the kernels' arithmetic aborts
UBSAN_FLAGS = ["-fsanitize=undefined", "-fno-sanitize=vptr", "-fno-sanitize-recover=undefined"]

_lib = None


def _build() -> Path:
    out = ROOT / "build/avx512-emulation" / f"libemu_avx512_{sources_key([Path(__file__), *SOURCES])}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        build_shared_library([compiler(), "-std=c++20", "-O1", "-g", "-fPIC", "-shared", "-Wl,--no-undefined",
                              f"-I{EMULATION}", f"-I{ROOT / 'csrc'}", str(EMULATION / "kernels.cpp"),
                              *map(str, PRODUCTION)], out, UBSAN_FLAGS)
    return out


def load():
    global _lib
    if _lib is None:
        _lib = ctypes.CDLL(str(_build()))
    return _lib


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr())


def _call(fn, q, scales, group, x, N, k_dim, vnni, n_begin, n_end):
    """y [B, N] from x [B, K'] (rows outside [n_begin, n_end) stay NaN)."""
    x = x.float().contiguous()
    n_end = N if n_end is None else n_end
    y = torch.full((x.shape[0], N), float("nan"))
    args = [ctypes.c_int(int(vnni)), _ptr(q.contiguous()), _ptr(scales.contiguous())]
    if group is not None:
        args.append(ctypes.c_int64(group))
    args += [_ptr(x), _ptr(y)] + [ctypes.c_int64(int(a)) for a in (x.shape[0], k_dim, N, n_begin, n_end)]
    rc = getattr(load(), fn)(*args)
    if rc != 0:
        raise ValueError(f"{fn}: " + {1: "an input is not finite", 2: "a group the kernel does not take"}[rc])
    return y


def gemv_int8(x, q, scales, vnni, n_begin=0, n_end=None):
    """The AVX-512 path of gemv_int8_rows with int16 inputs: x float32 [B, K], q int8 [N, K], scales [N]."""
    return _call("emu_avx512_int8_i16", q, scales, None, x, q.shape[0], q.shape[1], vnni, n_begin, n_end)


def _padded(x):
    """x with zeros to int4_padded_k columns, as gemv_int4_rows receives it."""
    return torch.nn.functional.pad(x.float(), (0, (-x.shape[1]) % 32))


def gemv_int4(x, q, scales, group, vnni, n_begin=0, n_end=None):
    """The AVX-512 path of gemv_int4_rows with int16 inputs (packed q, scales [N, groups])."""
    return _call("emu_avx512_int4_i16", q, scales, group, _padded(x), q.shape[0], x.shape[1], vnni, n_begin, n_end)


def gemv_int4_int8_inputs(x, q, scales, group, vnni, n_begin=0, n_end=None):
    """The same under set_quantized_activations("int8") (groups of whole 128-input blocks)."""
    return _call("emu_avx512_int4_i8", q, scales, group, _padded(x), q.shape[0], x.shape[1], vnni, n_begin, n_end)
