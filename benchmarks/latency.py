"""Latency of Emu's generate_image: upstream's recompute loop, the loops a user would write
instead (a Hugging Face KV-cache loop; a gpt-fast-style static-cache loop, eager and under
torch.compile) and emu_fast, side by side in one run, on one random-weight Emu-shaped model.

    python benchmarks/latency.py                 # CPU: hidden 512, 8 layers (GPU: Emu1-13B shape)
    python benchmarks/latency.py --dtype bfloat16 --batch 4 --json out.json
    python benchmarks/latency.py --sweep --skip-upstream --plot sweep.png

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

The compared loops live in benchmarks/peers.py, the machine description and bandwidth in
benchmarks/machine.py, the figure in benchmarks/plot.py.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import emu_fast  # noqa: E402
from emu_fast.dropin.families import family_named, family_of  # noqa: E402
from emu_fast.testing import rel_err, tiny_emu  # noqa: E402

from benchmarks.machine import OtherWork, busy_warning, describe, one_line, read_bandwidth, sync, timed  # noqa: E402
from benchmarks.peers import StaticCacheLoop, hf_kv_cache_generate_image, tokenized_prompt  # noqa: E402

SHAPES = {
    # name: (hidden, layers, heads, intermediate)
    "tiny": (64, 2, 4, 96),  # for tests: seconds, not a measurement
    "small": (512, 8, 8, 1376),
    "emu1-13b": (5120, 40, 40, 13824),
    "emu2-37b": (6656, 60, 52, 17920),
}
SWEEP_BATCHES = (1, 2, 4, 8, 16)
SWEEP_PROMPT_LENS = (64, 128, 256, 512, 1024)
# Methods, in the order they run and print.
UPSTREAM, HF, EAGER, COMPILED, FAST_ATEN, FAST = ("upstream recompute", "HF KV-cache loop", "static cache, eager",
                                                  "static cache, compiled", "emu_fast, ATen step", "emu_fast")
FAST_INT8, FAST_INT4, FAST_INT4_A8 = "emu_fast int8", "emu_fast int4", "emu_fast int4/int8 act"
METHODS = (UPSTREAM, HF, EAGER, COMPILED, FAST_ATEN, FAST, FAST_INT8, FAST_INT4, FAST_INT4_A8)
QUANTIZED = {FAST_INT8: "int8", FAST_INT4: "int4", FAST_INT4_A8: "int4"}
# Rows run under emu_fast.set_quantized_activations (CPU kernels only; they share a decoder above).
ACTIVATIONS = {FAST_INT4_A8: "int8"}
# Largest relative error per output vector that still counts as "the same result": float32
# as the tests require; half precision rounds every op and the fed-back loop compounds it.
TOLERANCE = {"float32": 1e-4, "bfloat16": 0.1, "float16": 0.1}
# Other processes using more CPUs than this, on average, while a point was measured make its
# figures suspect (the benchmark's threads wait for cores): such points are marked.
BUSY = 0.25


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
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="also profile this many emu_fast decode steps and print the top kernels/ops")
    args = p.parse_args(argv)
    if args.plot and not args.sweep:
        p.error("--plot draws a sweep: add --sweep")
    if args.compile_mode is None:
        args.compile_mode = "reduce-overhead" if args.device.startswith("cuda") else "default"
    return args


def build_model(args):
    hidden, layers, heads, inter = SHAPES[args.shape]
    # Hugging Face's default init (std 0.02): with larger random weights the fed-back loop is
    # chaotic and rounding differences grow to O(1) over 32 steps, hiding real errors.
    # Built on the device directly: an Emu1-13B shape would take minutes to initialize on the CPU.
    with torch.device(args.device):
        return tiny_emu(args.kind, hidden=hidden, layers=layers, heads=heads, intermediate=inter,
                        n=args.n or family_named(args.kind).default_n, dtype=getattr(torch, args.dtype),
                        init_std=0.02, device=args.device)


def prompts(model, batch, approx_len):
    """`batch` prompts of about approx_len tokens as generate_image tokenizes them (ragged: row b
    is shorter by 3*b tokens)."""
    words = "a watercolor painting of a red fox sitting in tall grass under the evening sky".split()
    family, tok = family_of(model), model.decoder.tokenizer

    def text(count):
        return " ".join(words[i % len(words)] for i in range(count))

    def tokens(count):
        return len(tok(family.prompt_texts(model, [text(count)])).input_ids[0])

    out = []
    for b in range(batch):
        target = max(4, approx_len - 3 * b)
        lo, hi = 0, max(1, target)  # fewest words reaching target tokens (a word is >= 1 token)
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if tokens(mid) < target else (lo, mid)
        out.append(text(lo))
    return out


def step_weights_bytes(model) -> int:
    """What a decode step must read: every layer, the final norm, the regression head and
    Emu2's project_up; not the embeddings."""
    family, lm = family_of(model), model.decoder.lm
    modules = [lm.model.layers, lm.model.norm, family.head(model), family.project_up(model)]
    return sum(p.numel() * p.element_size() for m in modules if m is not None for p in m.parameters())


def first_line(e: BaseException) -> str:
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0][:150] if lines else ''}"


def prefill_and_steps(prefill, steps, device, reps):
    """(median seconds of `prefill()`, best seconds of `steps(prefill())`, the n-1 decode
    steps) over the repetitions. Best for the steps, like the bandwidth they are compared with
    (other work on a shared machine only ever slows a run); both from the same runs, so a prefill is not run twice as often."""
    prefills, best = [], float("inf")
    for _ in range(max(3, reps)):
        sync(device)
        t0 = time.perf_counter()
        state = prefill()
        sync(device)
        t1 = time.perf_counter()
        steps(state)
        sync(device)
        prefills.append(t1 - t0)
        best = min(best, time.perf_counter() - t1)
    return statistics.median(prefills), best


class Bench:
    """One model, its upstream generate_image kept aside, and emu_fast accelerated, measured at
    one or more (batch, prompt length) points."""

    def __init__(self, args, max_batch: int, max_prompt: int):
        self.args = args
        torch.manual_seed(0)
        self.model = build_model(args)
        self.family = family_of(self.model)
        self.n = self.family.n(self.model)
        self.weight_bytes = step_weights_bytes(self.model)
        # Upstream's generate_image, kept before accelerate replaces it on the instance.
        self.upstream = self.model.generate_image
        self.bandwidth = read_bandwidth(args.device, self.weight_bytes)
        # +16: prompts() lands within a word (a few tokens) of its target
        emu_fast.accelerate(self.model, max_batch=max_batch, max_seq_len=max_prompt + 16 + self.n)
        # The same decoder on the portable step (what runs where emu_fast has no kernels).
        up = self.family.project_up(self.model)
        self.aten = emu_fast.EmuDecoder.from_llama(self.model.decoder.lm, self.family.head(self.model).weight,
                                                   None if up is None else up.weight, kernels="aten")
        # Weight-only int8 / int4 decoders, each over its own quantized copy of the language model
        # (the model itself stays unquantized for the other rows), and the read bandwidth at the
        # size of what each step reads.
        self.quantized = {}
        for name, scheme in QUANTIZED.items():
            if name in ACTIVATIONS:
                continue
            lm = copy.deepcopy(self.model.decoder.lm)
            head, up_copy = self.family.head(self.model).weight, None if up is None else up.weight
            dec = emu_fast.EmuDecoder.from_llama(lm, head, up_copy, weights=scheme,
                                                 max_batch=max_batch, max_seq_len=max_prompt + 16 + self.n)
            self.quantized[name] = (lm, dec, read_bandwidth(args.device, dec.weight_bytes))
        self.quantized[FAST_INT4_A8] = self.quantized[FAST_INT4]

    def measure_bandwidth_again(self):
        # Measured around the step timings and the larger kept: fractions are then lower bounds.
        self.bandwidth = max(self.bandwidth, read_bandwidth(self.args.device, self.weight_bytes))
        for name, (lm, dec, bw) in self.quantized.items():
            self.quantized[name] = (lm, dec, max(bw, read_bandwidth(self.args.device, dec.weight_bytes)))

    def point(self, batch: int, prompt_len: int, progress=None) -> dict:
        """Every method at one (batch, prompt length): {"methods": {name: row}, ...}. A row has
        image_s / step_s / prefill_s and `result` (the [B, n, D] output), or only a `note`
        saying why there is no figure."""
        texts = prompts(self.model, batch, prompt_len)
        embeds, mask = tokenized_prompt(self.model, texts)
        lens = mask.sum(1).tolist()
        rows: Dict[str, dict] = {}
        others = OtherWork().start()
        for name, method in ((UPSTREAM, self.upstream_row), (HF, self.hf_row), (EAGER, self.eager_row),
                             (COMPILED, self.compiled_row), (FAST_ATEN, self.emu_fast_aten_row),
                             (FAST, self.emu_fast_row), (FAST_INT8, self.quantized_row), (FAST_INT4, self.quantized_row),
                             (FAST_INT4_A8, self.quantized_row)):
            if progress is not None:
                progress.set_postfix_str(f"batch {batch}, prompt {max(lens)}: {name}")
            rows[name] = method(texts, embeds, mask, rows) if name not in QUANTIZED else method(name, embeds, mask)
        # (on a GPU other CPU work matters little; not reported there)
        busy = others.stop() if self.args.device == "cpu" else None
        return {"batch": batch, "prompt_len": prompt_len, "prompt_tokens": lens, "methods": rows,
                "other_cpus_busy": busy}

    def upstream_row(self, texts, embeds, mask, rows) -> dict:
        """n full forward passes over the re-tokenized, growing prompt."""
        if self.args.skip_upstream:
            return {"note": "skipped (--skip-upstream)"}
        t, out = timed(lambda: self.upstream(texts), self.args.device, self.args.reps)
        return {"image_s": t, "step_s": t / self.n, "result": out, "note": "no cache: step = image / n"}

    def hf_row(self, texts, embeds, mask, rows) -> dict:
        """The Hugging Face KV-cache loop, eager; its prefill timed on its own (the model's forward
        with use_cache) and the steps by difference."""
        args, lm = self.args, self.model.decoder.lm
        t_prefill, _ = timed(lambda: lm.model(inputs_embeds=embeds, attention_mask=mask, use_cache=True),
                             args.device, args.reps)
        t, out = timed(lambda: hf_kv_cache_generate_image(self.model, texts), args.device, args.reps)
        return {"image_s": t, "step_s": (t - t_prefill) / max(1, self.n - 1), "prefill_s": t_prefill, "result": out,
                "note": "step = (image - prefill) / (n-1)"}

    def eager_row(self, texts, embeds, mask, rows) -> dict:
        """The gpt-fast-style static-cache loop, sized to this point's prompt, eager."""
        return self.static_row(StaticCacheLoop(self.model, len(texts), embeds.shape[1] + self.n), texts, embeds, mask)

    def compiled_row(self, texts, embeds, mask, rows) -> dict:
        """The same loop with its decode step under torch.compile; the first call (which compiles)
        is timed apart and the gain over the eager step stated, or the failure."""
        args = self.args
        if args.no_compile:
            return {"note": "skipped (--no-compile)"}
        try:
            # Every loop compiles the same method: without a reset, each point's graph would
            # count as a recompilation of the previous ones and hit dynamo's limit (8).
            torch._dynamo.reset()
            loop = StaticCacheLoop(self.model, len(texts), embeds.shape[1] + self.n, compile_mode=args.compile_mode)
            t0 = time.perf_counter()
            loop.generate_image(texts)
            sync(args.device)
            compile_s = time.perf_counter() - t0
            row = self.static_row(loop, texts, embeds, mask)
        except Exception as e:  # no C++ compiler for inductor, an op it cannot lower, ...
            return {"note": f"compile failed: {first_line(e)}"}
        gain = rows[EAGER]["step_s"] / row["step_s"]
        row["compile_s"] = compile_s
        row["note"] = (f'mode "{args.compile_mode}", first call {compile_s:.0f} s; step '
                       + (f"{gain:.2f}x faster than eager" if gain > 1.03 else f"no gain over eager ({gain:.2f}x)"))
        return row

    def static_row(self, loop: StaticCacheLoop, texts, embeds, mask) -> dict:
        args, n = self.args, self.n
        t, out = timed(lambda: loop.generate_image(texts), args.device, args.reps)

        def steps(state):
            x = state[1]
            for k in range(1, n):
                x = loop.step(x, k)[1].clone()

        t_prefill, t_steps = prefill_and_steps(lambda: loop.prefill(embeds, mask), steps, args.device, args.reps)
        return {"image_s": t, "step_s": t_steps / max(1, n - 1), "prefill_s": t_prefill, "result": out}

    def emu_fast_aten_row(self, texts, embeds, mask, rows) -> dict:
        """EmuDecoder with kernels="aten" (plain ATen ops over the same cache layout: Apple and
        other GPUs), driven through its generate (the prompt already embedded)."""
        args, n, dec = self.args, self.n, self.aten
        t, out = timed(lambda: dec.generate(embeds, mask, n), args.device, args.reps)
        t_prefill, t_steps = prefill_and_steps(lambda: dec.prefill(embeds, mask), lambda out0: dec.decode(out0, n - 1),
                                               args.device, args.reps)
        return {"image_s": t, "step_s": t_steps / max(1, n - 1), "prefill_s": t_prefill, "result": out,
                "note": "EmuDecoder.generate: no tokenization"}

    def emu_fast_row(self, texts, embeds, mask, rows) -> dict:
        """The drop-in (the accelerated generate_image), and the decoder's prefill and steps timed
        apart."""
        args, n, dec = self.args, self.n, self.model.emu_fast_decoder
        t, out = timed(lambda: self.model.generate_image(texts), args.device, args.reps)
        # decode() runs the n - 1 steps as generate_image does: on a GPU one captured CUDA graph
        # replayed per step (step() alone is eager, one launch per op).
        t_prefill, t_steps = prefill_and_steps(lambda: dec.prefill(embeds, mask), lambda out0: dec.decode(out0, n - 1),
                                               args.device, args.reps)
        self.profile_inputs = (embeds, mask, dec.prefill(embeds, mask))
        return {"image_s": t, "step_s": t_steps / max(1, n - 1), "prefill_s": t_prefill, "result": out}


    def quantized_row(self, name, embeds, mask) -> dict:
        """EmuDecoder on weight-only quantized projections (QUANTIZED[name]), driven like the
        ATen row: its generate, then its prefill and n - 1 decode steps timed apart."""
        args, n = self.args, self.n
        _, dec, bandwidth = self.quantized[name]
        activations = ACTIVATIONS.get(name)
        if activations and args.device != "cpu":
            return {"note": f"{activations} activations: a CPU kernel option (the GPU ones dequantize)"}
        emu_fast.set_quantized_activations(activations or "auto")
        try:
            t, out = timed(lambda: dec.generate(embeds, mask, n), args.device, args.reps)
            t_prefill, t_steps = prefill_and_steps(lambda: dec.prefill(embeds, mask),
                                                   lambda out0: dec.decode(out0, n - 1), args.device, args.reps)
        finally:
            emu_fast.set_quantized_activations("auto")
        return {"image_s": t, "step_s": t_steps / max(1, n - 1), "prefill_s": t_prefill, "result": out,
                # a smaller buffer reads at least as fast as the model-sized one: the larger of the two
                "step_bytes": dec.weight_bytes, "bandwidth": max(bandwidth, self.bandwidth), "quantized": True,
                "note": f"{QUANTIZED[name]}{' g' + str(dec.group_size) if dec.group_size else ''}"
                        f"{', ' + activations + ' activations' if activations else ''}; error = quantization's"}


def figures(point: dict, weight_bytes: int, bandwidth: float, dtype: str) -> dict:
    """The JSON row of each method (result tensors reduced to their error against the
    reference), keeping the keys earlier results/*.json use; None where there is no figure."""
    rows = point["methods"]
    ref_name = UPSTREAM if "result" in rows[UPSTREAM] else HF
    ref = rows[ref_name]["result"]
    up = rows[UPSTREAM].get("image_s")
    hf = rows[HF]["image_s"]
    out = {}
    for name, r in rows.items():
        if "image_s" not in r:
            out[name] = {"status": "failed" if r["note"].startswith("compile failed") else "skipped",
                         "note": r["note"], "image_ms": None, "step_ms": None}
            continue
        # A weight-read rate only means something for a cached decode step.
        # (the quantized rows read their own, smaller, weights, against the bandwidth at that size)
        step_bytes, bw = r.get("step_bytes", weight_bytes), r.get("bandwidth", bandwidth)
        gbs = step_bytes / r["step_s"] / 1e9 if name != UPSTREAM else None
        err = rel_err(r["result"], ref)
        f = {"status": "ok", "note": r.get("note", ""),
             "image_ms": r["image_s"] * 1e3, "step_ms": r["step_s"] * 1e3,
             "prefill_ms": r["prefill_s"] * 1e3 if "prefill_s" in r else None,
             "speedup_vs_upstream": up / r["image_s"] if up else None,
             "speedup_vs_hf_kv": hf / r["image_s"],
             "step_weight_bytes": step_bytes if name != UPSTREAM else None,
             "step_weight_read_GBps": gbs,
             "read_bandwidth_GBps": bw / 1e9,
             "fraction_of_bandwidth": gbs * 1e9 / bw if gbs else None,
             "max_rel_err_vs_reference": err,
             "reference": ref_name,
             # quantized rows: their error is what quantization adds, not a kernel's; not judged
             "matches_reference": None if r.get("quantized") else err <= TOLERANCE[dtype]}
        if "compile_s" in r:
            f["compile_s"] = r["compile_s"]
        out[name] = f
    return out


def print_table(methods: dict, dtype: str):
    ref = next((f["reference"] for f in methods.values() if f["status"] == "ok"))
    print(f"{'method':<24}{'per image':>11}{'per step':>11}{'prefill':>10}{'vs upstream':>12}{'vs HF KV':>9}"
          f"{'step MB':>9}{'step GB/s':>10}{'% of bw':>8}{'rel err':>9}  note (rel err vs {ref}, tolerance {TOLERANCE[dtype]:g})")
    for name, f in methods.items():
        if f["status"] != "ok":
            print(f"{name:<24}{f['note']}")
            continue

        def num(v, fmt, suffix=""):
            return "-" if v is None else format(v, fmt) + suffix
        note = f["note"] + ("; DOES NOT MATCH the reference" if f["matches_reference"] is False else "")
        print(f"{name:<24}{num(f['image_ms'], '.1f', 'ms'):>11}{num(f['step_ms'], '.2f', 'ms'):>11}"
              f"{num(f['prefill_ms'], '.1f', 'ms'):>10}{num(f['speedup_vs_upstream'], '.1f', 'x'):>12}"
              f"{num(f['speedup_vs_hf_kv'], '.1f', 'x'):>9}"
              f"{num(f['step_weight_bytes'] and f['step_weight_bytes'] / 1e6, '.1f'):>9}"
              f"{num(f['step_weight_read_GBps'], '.1f'):>10}"
              f"{num(f['fraction_of_bandwidth'] and 100 * f['fraction_of_bandwidth'], '.0f', '%'):>8}"
              f"{f['max_rel_err_vs_reference']:>9.1e}  {note.strip('; ')}")


def profile_steps(dec, embeds, mask, out0, steps, device):
    """Where a decode step's time goes: torch.profiler over `steps` steps, the top entries by
    self time. On a GPU the graph replays (CUPTI still sees each kernel); on the CPU the
    one-region step is opaque to the profiler, so its op-by-op equivalent is profiled."""
    from torch.profiler import ProfilerActivity, profile

    gpu = device.startswith("cuda")
    fused = dec.fused_cpu_step
    dec.fused_cpu_step = False
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    dec.prefill(embeds, mask)
    dec.decode(out0, steps)  # warm: graph captured
    dec.prefill(embeds, mask)
    sync(device)
    with profile(activities=activities) as prof:
        dec.decode(out0, steps)
        sync(device)
    dec.fused_cpu_step = fused
    key = "self_device_time_total" if gpu else "self_cpu_time_total"
    print(f"profile of {steps} decode steps (top 15 by {key}):")
    print(prof.key_averages().table(sort_by=key, row_limit=15))


def sweep_table(title: str, points: List[dict], key: str, methods: List[str]):
    print(f"\n{title}: time per decode step in ms (per image in ms)")
    print(f"{key:>8}" + "".join(f"{m:>26}" for m in methods))
    why = {}  # full reasons for the cells without a figure, printed under the table
    for p in points:
        cells = []
        for m in methods:
            f = p["methods"][m]
            if f["status"] != "ok":
                cells.append(f["note"] if len(f["note"]) <= 25 else f"{f['status']} (see below)")
                why.setdefault((m, f["note"]), None)
            else:
                mark = " !" if f["matches_reference"] is False else ""
                cells.append(f"{f['step_ms']:.2f} ({f['image_ms']:.0f}){mark}")
        x = p["batch"] if key == "batch" else max(p["prompt_tokens"])
        busy = p["other_cpus_busy"] is not None and p["other_cpus_busy"] > BUSY
        print(f"{'*' if busy else '':>2}{x:>6}" + "".join(f"{c:>26}" for c in cells))
    for m, note in why:
        if len(note) > 25:
            print(f"  {m}: {note}")


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
            p["methods"] = _refraction(p["methods"], bench.bandwidth)
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


def _refraction(figs: dict, bandwidth: float) -> dict:
    for name, f in figs.items():
        if f.get("step_weight_read_GBps") and name not in QUANTIZED:  # (those have their own)
            f["fraction_of_bandwidth"] = f["step_weight_read_GBps"] * 1e9 / bandwidth
    return figs


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
