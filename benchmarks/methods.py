"""The methods benchmarks/latency.py compares, measured on one model: `Bench` builds the
random-weight Emu-shaped model, keeps its upstream generate_image aside, accelerates it, and
times every method at a (batch, prompt length) point (`Bench.point`), each row with its result
tensor; `profile_steps` shows where an emu_fast decode step's time goes."""
from __future__ import annotations

import copy
import statistics
import time
from typing import Dict

import torch

import emu_fast
from emu_fast.dropin.families import family_named, family_of
from emu_fast.testing import tiny_emu

from benchmarks.machine import OtherWork, read_bandwidth, sync, timed
from benchmarks.peers import StaticCacheLoop, hf_kv_cache_generate_image, tokenized_prompt

SHAPES = {
    # name: (hidden, layers, heads, intermediate)
    "tiny": (64, 2, 4, 96),  # for tests: seconds, not a measurement
    "small": (512, 8, 8, 1376),
    "emu1-13b": (5120, 40, 40, 13824),
    "emu2-37b": (6656, 60, 52, 17920),
}
# Methods, in the order they run and print.
UPSTREAM, HF, EAGER, COMPILED, FAST_ATEN, FAST = ("upstream recompute", "HF KV-cache loop", "static cache, eager",
                                                  "static cache, compiled", "emu_fast, ATen step", "emu_fast")
FAST_INT8, FAST_INT4, FAST_INT4_A8 = "emu_fast int8", "emu_fast int4", "emu_fast int4/int8 act"
METHODS = (UPSTREAM, HF, EAGER, COMPILED, FAST_ATEN, FAST, FAST_INT8, FAST_INT4, FAST_INT4_A8)
QUANTIZED = {FAST_INT8: "int8", FAST_INT4: "int4", FAST_INT4_A8: "int4"}
# Rows run under emu_fast.set_quantized_activations (CPU kernels only; they share a decoder above).
ACTIVATIONS = {FAST_INT4_A8: "int8"}


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
