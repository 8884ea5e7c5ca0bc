#!/usr/bin/env python3
"""Counts the first-use self-check's false alarms on the CPU: over seeds, Emu1 / Emu2, float32 /
bfloat16, float / int8 / int4 weights (int4 in groups of 64: bf16 activations then take the
int16-input kernels) and two shapes (tiny_emu's default, and one whose sizes are not multiples of
32), builds emu_fast.accelerate(tiny_emu(...), weights=...) and runs generate_image on a ragged
batch of 3 prompts. With the kernels correct every decoder whose fallback_reason is set is a
false alarm; each is printed, then the count. Exit status 1 if there is any.

    python scripts/self_check_sweep.py [--seeds 10]

Run it on each kind of processor (AVX2, AVX-512): which kernels run, and so how our step rounds
against the ATen step's, depends on the instruction set.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import emu_fast  # noqa: E402
from emu_fast.testing import emu_tokenizer, tiny_emu  # noqa: E402

PROMPTS = ["a photo of a cat", "an oil painting of a dog riding a bicycle, at dawn", "hi"]
SHAPES = {"even": {}, "odd": {"hidden": 80, "heads": 4, "kv_heads": 2, "intermediate": 150}}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
WEIGHTS = {"float": (None, None), "int8": ("int8", None), "int4": ("int4", 64)}


def best_isa() -> str:
    """The instruction set the CPU kernels run with here (the test hook accepts only those this
    processor has; "" puts back the default)."""
    try:
        return next(isa for isa in reversed(emu_fast._C._cpu_isa_levels()) if emu_fast._C._set_cpu_isa(isa))
    finally:
        emu_fast._C._set_cpu_isa("")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=10, help="seeds 0 .. N-1 (default 10)")
    args = ap.parse_args()
    os.environ.pop("EMU_FAST_SELF_CHECK", None)  # the check as it runs by default
    tokenizer = emu_tokenizer()
    runs, alarms = 0, []
    for seed, kind, dtype, weights, shape in itertools.product(range(args.seeds), ["emu1", "emu2"], DTYPES, WEIGHTS,
                                                               SHAPES):
        scheme, group = WEIGHTS[weights]
        model = tiny_emu(kind, tokenizer=tokenizer, dtype=DTYPES[dtype], seed=seed, **SHAPES[shape])
        emu_fast.accelerate(model, weights=scheme, group_size=group)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the reason is read below
            model.generate_image(PROMPTS)
        runs += 1
        reason = model.emu_fast_decoder.fallback_reason
        if reason:
            alarms.append((seed, kind, dtype, weights, shape, reason))
            print(f"false alarm: seed {seed} {kind} {dtype} {weights} {shape}: {reason}", flush=True)
    print(f"{len(alarms)} false alarms in {runs} decoders (quantized kernels: {best_isa()})")
    return 1 if alarms else 0


if __name__ == "__main__":
    sys.exit(main())
