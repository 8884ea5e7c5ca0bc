"""Microbenchmark of the weight-only quantized GEMVs against the 16-bit one:
gemv (bfloat16 weights), gemv_int8 and gemv_int4 at one projection's shape, on the CPU or a GPU
(on the CPU also gemv_int4 under emu_fast.set_quantized_activations("int8")).

    python benchmarks/quantized_gemv.py [--k 5120] [--n 5120] [--batch 1] [--reps 50] [--threads T]
    python benchmarks/quantized_gemv.py --device cuda --k 5120 --n 15360 --batch 8

On a GPU the ops run their CUDA kernels (bf16 activations: the tensor-core GEMVs) and the
bandwidth beside them is a device-to-device copy's (read + write bytes).

Each op cycles through enough distinct weight matrices (>= 256 MB in all) that every call reads
its weights from memory, not from the last-level cache, as a decode step does. Reported: the
median time per call, the bytes each call reads (weights + scales; the activations are a few
KB) and the bandwidth that makes, beside the machine's read bandwidth measured in the same run
(benchmarks/machine.py).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.machine import read_bandwidth, timed  # noqa: E402
import emu_fast  # noqa: E402
from emu_fast import ops  # noqa: E402
from emu_fast.quant.schemes import quantize_int4, quantize_int8  # noqa: E402

WORKING_SET = 256 * 2**20
INT4_INT8_ACT = "gemv_int4, int8 activations"


def with_int8_activations(fn):
    emu_fast.set_quantized_activations("int8")
    try:
        return fn()
    finally:
        emu_fast.set_quantized_activations("auto")


def weight_sets(k: int, n: int, group: int, device: str = "cpu"):
    """{op name: (fn(x, i), bytes per call, copies)}."""
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(n, k, generator=g) * k ** -0.5).to(device)
    q8, s8 = quantize_int8(w)
    q4, s4 = quantize_int4(w, group)
    w16 = w.to(torch.bfloat16)
    del w
    sets = {}
    for name, tensors, fn in [
        ("gemv bf16", (w16,), lambda x, t: ops.gemv(x, t[0])),
        ("gemv_int8", (q8, s8), lambda x, t: ops.gemv_int8(x, *t)),
        ("gemv_int4", (q4, s4), lambda x, t: ops.gemv_int4(x, *t, group)),
        # the same int4 product under emu_fast.set_quantized_activations("int8") (CPU only)
        (INT4_INT8_ACT, (q4, s4), lambda x, t: with_int8_activations(lambda: ops.gemv_int4(x, *t, group))),
    ]:
        if name == INT4_INT8_ACT and device != "cpu":
            continue
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        copies = max(2, -(-WORKING_SET // nbytes))
        sets[name] = ([tuple(t.clone() for t in tensors) for _ in range(copies)], fn, nbytes)
    return sets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=5120)
    ap.add_argument("--n", type=int, default=5120)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    dev = args.device
    bw = read_bandwidth(dev, WORKING_SET)
    if dev == "cpu":
        print(f"threads {torch.get_num_threads()}, read bandwidth (sum of a 256 MB float32 buffer) {bw / 1e9:.1f} GB/s")
    else:
        print(f"{torch.cuda.get_device_name(dev)}, copy bandwidth (read + write of 1 GiB) {bw / 1e9:.0f} GB/s")
    print(f"x [{args.batch}, {args.k}] bfloat16, weights [{args.n}, {args.k}], int4 group {args.group}")
    x = torch.randn(args.batch, args.k).to(torch.bfloat16).to(dev)
    base = None
    for name, (copies, fn, nbytes) in weight_sets(args.k, args.n, args.group, dev).items():
        state = {"i": 0}

        def call():
            state["i"] = (state["i"] + 1) % len(copies)
            return fn(x, copies[state["i"]])

        sec, _ = timed(call, dev, args.reps)
        base = base or sec
        print(f"{name:10s} {sec * 1e3:7.3f} ms  reads {nbytes / 1e6:6.1f} MB  {nbytes / sec / 1e9:6.1f} GB/s "
              f"({nbytes / sec / bw:4.0%} of read bandwidth)  {base / sec:4.2f}x bf16")


if __name__ == "__main__":
    main()
