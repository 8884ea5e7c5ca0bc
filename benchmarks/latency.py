"""Latency of Emu's generate_image: upstream's recompute loop, the loops a user would write
instead (a Hugging Face KV-cache loop; a gpt-fast-style static-cache loop, eager and under
torch.compile) and emu_fast, side by side in one run, on one random-weight Emu-shaped model.

    python benchmarks/latency.py                 # CPU: hidden 512, 8 layers (GPU: Emu1-13B shape)
    python benchmarks/latency.py --dtype bfloat16 --batch 4 --json out.json
    python benchmarks/latency.py --sweep --skip-upstream --plot sweep.png
    torchrun --nproc-per-node 2 benchmarks/latency.py --tp 2   # tensor parallelism (tensor_parallel.py)

Reports time per image (median of --reps), per decode step and per prefill, speed-ups, each
method's largest relative error against the model's own generate_image (or, with
--skip-upstream, against the Hugging Face loop), and the weight-read bandwidth a decode step
achieves (best of the repetitions) against the machine's own bandwidth measured in the same
run, also best of several (CPU: summing a buffer the size of one step's weights; GPU: copy
bandwidth of a device-to-device copy, read + write bytes).

Per-step times: the static-cache loops and emu_fast time their n-1 decode steps directly
(best of the repetitions); the Hugging Face loop's is (image - prefill) / (n-1), medians; the
upstream loop has no decode step, its figure is image / n (each one a full pass).

--sweep measures batch 1..16 at the default prompt length and prompt length 64..1024 at batch
1 (not the full grid), with the same methods; --plot draws it. The upstream loop re-runs the
whole sequence n times, minutes per point at the larger sizes: --skip-upstream leaves it out.
On the CPU, the CPUs other processes used while each point ran are recorded and such points
are marked: the figures of a shared machine are only as good as its quiet moments.

"emu_fast int8" / "emu_fast int4": the same decoder on weight-only int8 / int4 (group 128)
projections of a quantized copy of the model (emu_fast.accelerate(..., weights=...)), activations
in the model's dtype; their error is against the unquantized reference, so it is what
quantization adds (not held to the tolerance), and their weight reads are the bytes they read
(qweights, scales, norms, head), against the bandwidth of reading a buffer of that size.
"emu_fast int4/int8 act" (CPU only): the int4 decoder under
emu_fast.set_quantized_activations("int8"), its GEMVs' inputs rounded to int8 blocks.

The compared loops live in benchmarks/peers.py, their measurement at a point in
benchmarks/methods.py, the figures and tables in benchmarks/tables.py, the machine description
and bandwidth in benchmarks/machine.py, the figure in benchmarks/plot.py.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path
from typing import Dict, List

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import busy_warning, describe, one_line  # noqa: E402
# The method names (UPSTREAM, HF, ...) are this module's too: callers and tests read them here.
from benchmarks.methods import (COMPILED, EAGER, FAST, FAST_ATEN, HF, METHODS, SHAPES, UPSTREAM,  # noqa: E402,F401
                                Bench, profile_steps)
from benchmarks.tables import BUSY, TOLERANCE, figures, print_table, refraction, sweep_table  # noqa: E402

SWEEP_BATCHES = (1, 2, 4, 8, 16)
SWEEP_PROMPT_LENS = (64, 128, 256, 512, 1024)


def int_list(text: str) -> List[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gpu = torch.cuda.is_available()
    p.add_argument("--device", default="cuda" if gpu else "cpu")
    p.add_argument("--shape", choices=SHAPES, default="emu1-13b" if gpu else "small")
    p.add_argument("--kind", choices=["emu1", "emu2"], default="emu1")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16" if gpu else "float32")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=128 if gpu else 80, help="approximate prompt tokens")
    p.add_argument("--n", type=int, default=None, help="embeddings per image (default: the family's, Emu1 32, Emu2 64)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--skip-upstream", action="store_true",
                   help="skip the (slow) recompute loop; errors are then against the Hugging Face loop")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd static-cache loop")
    p.add_argument("--compile-mode", default=None,
                   help='torch.compile mode for the static-cache step (default: "reduce-overhead" on CUDA, '
                        '"default" on CPU)')
    p.add_argument("--sweep", action="store_true",
                   help="batch 1..16 at --prompt-len, and prompt length 64..1024 at batch 1")
    p.add_argument("--sweep-batches", type=int_list, default=list(SWEEP_BATCHES), metavar="B,B,...")
    p.add_argument("--sweep-prompt-lens", type=int_list, default=list(SWEEP_PROMPT_LENS), metavar="T,T,...")
    p.add_argument("--plot", metavar="PNG", help="with --sweep: draw time per decode step vs batch and prompt length")
    p.add_argument("--json", metavar="PATH", help="also write the figures to this JSON file")
    p.add_argument("--tp", type=int, default=0, metavar="N",
                   help="tensor parallelism over N processes, run under torchrun --nproc-per-node N: emu_fast "
                        "with each rank holding 1/N of every layer, against one process (benchmarks/tensor_parallel.py)")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="also profile this many emu_fast decode steps and print the top kernels/ops")
    args = p.parse_args(argv)
    if args.plot and not args.sweep:
        p.error("--plot draws a sweep: add --sweep")
    if args.compile_mode is None:
        args.compile_mode = "reduce-overhead" if args.device.startswith("cuda") else "default"
    return args


def run_sweep(args, machine):
    from tqdm import tqdm

    batches, lens = args.sweep_batches, args.sweep_prompt_lens
    plan = [("batch", b, args.prompt_len) for b in batches] + [("prompt", 1, t) for t in lens]
    bench = Bench(args, max_batch=max(batches + [1]), max_prompt=max(lens + [args.prompt_len]))
    print(f"{args.shape} ({args.kind}) {args.dtype}, {bench.n} outputs | {len(plan)} points")
    done = {"batch": [], "prompt": []}
    with tqdm(plan, desc="sweep", unit="point", file=sys.stderr) as progress:
        for axis, batch, prompt_len in progress:
            point = bench.point(batch, prompt_len, progress)
            # the result tensors give way to their errors
            point["methods"] = figures(point, bench.weight_bytes, bench.bandwidth, args.dtype)
            done[axis].append(point)
            # after every point (40 ms): the floor drawn is then the best reading of the sweep
            bench.measure_bandwidth_again()
    for points in done.values():  # fractions of the final (larger) bandwidth
        for p in points:
            p["methods"] = refraction(p["methods"], bench.bandwidth)
    methods = list(METHODS)
    floor_ms = bench.weight_bytes / bench.bandwidth * 1e3
    print(f"decode-step weights: {bench.weight_bytes / 2**20:.1f} MiB; machine bandwidth {bench.bandwidth / 1e9:.1f} GB/s; "
          f"weight-read floor {floor_ms:.2f} ms per step")
    sweep_table(f"vs batch (prompt ~{args.prompt_len} tokens)", done["batch"], "batch", methods)
    sweep_table("vs prompt length (batch 1)", done["prompt"], "prompt", methods)
    bad = sorted({m for ps in done.values() for p in ps for m, f in p["methods"].items()
                  if f["status"] == "ok" and f["matches_reference"] is False})
    print("all results match the reference" if not bad else f"'!': DOES NOT MATCH the reference: {', '.join(bad)}")
    busy = [p for ps in done.values() for p in ps if (p["other_cpus_busy"] or 0) > BUSY]
    if busy:
        print(f"'*': other processes kept {min(p['other_cpus_busy'] for p in busy):.1f} to "
              f"{max(p['other_cpus_busy'] for p in busy):.1f} CPUs busy while this point was measured: noisy")
    if args.plot:
        from benchmarks.plot import methods_in, plot_sweep

        as_plot = {k: [{"batch": p["batch"], "prompt_tokens": max(p["prompt_tokens"]), "methods": p["methods"],
                        "busy": (p["other_cpus_busy"] or 0) > BUSY} for p in ps] for k, ps in done.items()}
        shown = methods_in(as_plot["batch"] + as_plot["prompt"])
        # Say why a method is missing, or has gaps, rather than leave the reader to guess.
        why: Dict[str, Dict[str, None]] = {}
        for ps in done.values():
            for p in ps:
                for m, f in p["methods"].items():
                    if f["status"] != "ok":
                        why.setdefault(m, {}).setdefault(f["note"])
        note = (f"weight-read floor: the step's {bench.weight_bytes / 2**20:.1f} MiB of weights at "
                f"{bench.bandwidth / 1e9:.1f} GB/s measured bandwidth (KV-cache reads not counted)")
        for m, notes in why.items():
            note += f"\n{m}: {'not shown' if m not in shown else 'gaps'}, {'; '.join(notes)}"
        if any(p["busy"] for ps in as_plot.values() for p in ps):
            note += "\nhollow markers: other processes kept CPUs busy while that point was measured (noisy)"
        plot_sweep(args.plot, as_plot["batch"], as_plot["prompt"], shown, floor_ms, note,
                   f"Emu generate_image decode step | {args.shape} ({args.kind}) {args.dtype}, {bench.n} outputs\n"
                   f"{one_line(machine)}")
        print(f"wrote {args.plot}")
    return bench, {"sweep": {"batch": done["batch"], "prompt_len": done["prompt"]}}


def run_point(args, machine):
    bench = Bench(args, max_batch=args.batch, max_prompt=args.prompt_len)
    point = bench.point(args.batch, args.prompt_len)
    bench.measure_bandwidth_again()
    figs = figures(point, bench.weight_bytes, bench.bandwidth, args.dtype)
    lens = point["prompt_tokens"]
    print(f"{args.shape} ({args.kind}) {args.dtype} | batch {args.batch}, prompt {max(lens)} tokens, {bench.n} outputs")
    print(f"decode-step weights: {bench.weight_bytes / 2**20:.1f} MiB; machine bandwidth "
          f"({'device-to-device copy' if args.device.startswith('cuda') else 'reading a same-size buffer'}): "
          f"{bench.bandwidth / 1e9:.1f} GB/s; step floor at that bandwidth: "
          f"{bench.weight_bytes / bench.bandwidth * 1e3:.2f} ms")
    print_table(figs, args.dtype)
    if (point["other_cpus_busy"] or 0) > BUSY:
        print(f"warning: other processes kept {point['other_cpus_busy']:.1f} CPUs busy during the measurement: "
              "the figures are noisy")
    if args.profile:
        profile_steps(bench.model.emu_fast_decoder, *bench.profile_inputs, args.profile, args.device)
    return bench, {"prompt_tokens": lens, "methods": figs, "other_cpus_busy": point["other_cpus_busy"]}


@torch.no_grad()
def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.tp:
        from benchmarks.tensor_parallel import run

        return run(args)
    torch.set_num_threads(args.threads)
    machine = describe(args.device)
    print(f"emu_fast latency | {one_line(machine)}")
    if busy_warning(machine):
        print(busy_warning(machine))
    bench, results = (run_sweep if args.sweep else run_point)(args, machine)
    payload = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": machine["emu_fast_commit"],
        "device": f"{machine['gpu'] or machine['cpu']}, {machine['threads']} threads",
        "torch": torch.__version__,
        "machine": machine,
        "config": {k: v for k, v in vars(args).items() if k not in ("json", "plot")},
        "n": bench.n, "step_weight_bytes": bench.weight_bytes,
        "read_bandwidth_GBps": bench.bandwidth / 1e9,
        "tolerance": TOLERANCE[args.dtype],
        **results,
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    return payload


if __name__ == "__main__":
    main()
