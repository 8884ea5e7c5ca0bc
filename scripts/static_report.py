#!/usr/bin/env python3
"""Static performance report of the CUDA decode step: ESTIMATES FROM COMPILED CODE (no GPU ran this).

One command: `python scripts/static_report.py` compiles every csrc/kernels/cuda/*.cuh with its
launchers instantiated for sm_90a and sm_80, reads ptxas -v (registers, spills, shared memory) and
the SASS (nvdisasm on the cubin), and feeds a latency/issue model that estimates the time of every
kernel the step launches and of the whole step, for Emu1-13B and Emu2 in bf16, batch 1 and 8, 160
and 640 keys. Writes <out>-<arch>.json per arch and <out>.md (default out:
benchmarks/results/static-report). --kernels-source DIR reads the kernels of another tree (a clean
`git worktree` for a stable "before").

The model (also written into the Markdown); sm_90a code is modelled on the H100 SXM (the primary, as
in issue 9; --gpu h200 for the H200), sm_80 code on the A100 SXM 80GB (2.04 TB/s, 108 SMs, 1.41 GHz):
  * Bandwidth: bytes / (peak x dram_eff). Peak 3.35 TB/s (H200 4.8), dram_eff 0.92 (what a pure
    stream reaches); the weight-read floor is weight bytes / raw peak (25.4 GB -> 7.6 ms).
  * Latency (Little's law, wave-aware): the main loop of each kernel (the backward branch with the
    most wide global loads) is run as ONE warp in SASS order with a scoreboard: each instruction
    issues one cycle after the previous, or when its source registers are ready; a DRAM-stream load
    (the GEMV's evict-first weight loads, the attention's K/V loads) is ready after dram_ns, another
    global load (cached x, tables) after l2_ns, shared memory after 30 cycles, anything else after
    4 cycles. Branches inside the loop are taken (true at batch == the template batch). That gives
    ns per iteration per warp; a kernel's latency time = waves x iterations per warp x that, with
    waves = ceil(blocks / (resident blocks per SM x SMs)). Equivalent Little's-law bandwidth =
    resident warps x 32 lanes x loads in flight x bytes per load x SMs / dram_ns (reported).
  * Issue: warp-instructions of the main loop x iterations x warps / (4 per clock per SM x SMs x
    clock); H100 clock 1.98 GHz (boost).
  * Kernel time = max(bandwidth, latency, issue) + a fixed prologue/epilogue chain (DRAM round trips
    read from the source, table KERNEL_CHAINS) + the launch gap inside a CUDA graph (gap_us, 2.0 us
    per kernel: launch, fill and drain). Where the source launches the step's kernels with
    programmatic dependent launch (EMU_FAST_LAUNCH_PDL, griddepcontrol in common.cuh), a kernel of
    ours that follows one of ours pays pdl_gap_us instead, in sm_90a code only (0.8 us: its blocks are resident and its
    first weight loads issued while the previous kernel drains; what is left is the wait for that
    grid's completion and memory flush, an assumption no GPU has checked; the chain's round trips
    made before the wait, CHAIN_BEFORE_WAIT, leave the chain); a kernel after an ATen
    kernel (the step's first) still pays gap_us. The per-step table gives the step at gap_us for
    every kernel too, so the PDL assumption's weight is visible.
  * Attention's split-KV combine: a second kernel, or, where the source passes split_counters
    (the last split of each row merges), 2 L2 round trips (the counter's atomic, the partials)
    added to the attention kernel's chain.
  * Step = one layer's kernels x layers + the regression head (+ Emu2's project_up) + 3 small ATen
    kernels (h + branch, lengths += 1, positions). KV bytes per layer per sequence = 2 x keys x
    heads x head_dim x 2 B. Cache capacity = keys + 1 rounded up to 128 (the decoder's rounding),
    which sets the split count through plan_decode_attention's rule (the modelled GPU's SMs).
  * Optimistic where two terms are close (max, not sum; DRAM latency does not grow with load
    here); a kernel whose chain + gap dominate is labelled "launch+chain".
"""
import argparse, json, math, os, re, sys, tempfile

# What the compiled code says (ptxas, SASS, occupancy, the main loop's scoreboard) and what the
# source tree says (which launch and fusion choices it makes), each in its own module beside this.
from static_report_sass import SM_LIMITS, find_tool, iteration_cycles, kernel_table
from static_report_source import combine_folded, describe, fused_layer, pdl_launches, silu_epilogue, split_rule

LABEL = "estimate from compiled code (no GPU ran this)"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPUS = {  # spec sheet figures; the model's primary is the H100 SXM, as in issue 9
    "h100": dict(name="H100 SXM", bw=3.35e12, sms=132, clock=1.98e9),
    "h200": dict(name="H200", bw=4.8e12, sms=132, clock=1.98e9),
    "a100": dict(name="A100 SXM 80GB", bw=2.039e12, sms=108, clock=1.41e9),
}
MODELS = {
    "Emu1-13B": dict(hidden=5120, layers=40, heads=40, kv_heads=40, head_dim=128, inter=13824, head=(5120, 5120), up=None),
    "Emu2": dict(hidden=6656, layers=60, heads=52, kv_heads=52, head_dim=128, inter=17920, head=(1792, 6656), up=(6656, 1792)),
}
# The DRAM round trips outside the main loop, read from the source: loads of lengths / inputs,
# the reductions' barriers, the final stores.
KERNEL_CHAINS = {"gemv": 1, "gemv_norm": 3, "attention": 3, "combine": 3, "rms_norm": 2, "silu_mul": 2, "aten_small": 1}
# Of those, the round trips a kernel makes before its griddepcontrol.wait under PDL (they overlap the
# previous kernel): attention reads the lengths / positions, then the RoPE coefficients, before it.
# (The GEMVs' pre-wait weight loads belong to the main loop, not to the chain.)
CHAIN_BEFORE_WAIT = {"attention": 2}


def find(kernels, kind, pred=lambda n: True):
    """The kernel of a kind whose readable name satisfies pred (e.g. the batch-8 GEMV)."""
    hits = [n for n, k in kernels.items() if k["kind"] == kind and pred(n)]
    if not hits:
        sys.exit(f"static_report: no bf16 {kind} kernel matches; kernels: {sorted(kernels)}")
    return hits[0]


def gemv_name(kernels, batch, norm, silu=False):
    """The instantiation launch_gemv picks for bf16 at the Emu shapes (K a multiple of 32): the
    tensor-core kernel (one tile of 8 batch rows, two up to 16) where the tree has one, else the
    CUDA-core kernel's smallest template batch >= batch. Returns (name, output rows per block)."""
    mma = {}
    for n, k in kernels.items():
        m = re.search(r"bfloat16, (\d+), (true|false)(?:, (true|false))?>", n)
        if k["kind"] == "gemv_mma" and m and (m[2] == "true") == norm and (m[3] == "true") == silu:
            mma[int(m[1])] = n
    tiles = 1 if batch <= 8 else 2
    if tiles in mma:
        return mma[tiles], 16
    tb = {}
    for n, k in kernels.items():
        if k["kind"] == "gemv" and (m := re.search(r"bfloat16, (\d+), (true|false)>", n)) and (m[2] == "true") == norm:
            tb[int(m[1])] = n
    return tb[min(b for b in tb if b >= batch)], 8


def estimate(k, a, bytes_, blocks, warps_per_block, iters_per_warp, chain, gap_us=None, extra_ns=0.0):
    """One launch: max(bandwidth, wave-aware latency, issue) + prologue/epilogue chain + gap (s).
    gap_us: the launch gap (default a["gap_us"]); extra_ns: fixed latency beyond the DRAM chain."""
    g = a["gpu"]
    t_bw = bytes_ / (g["bw"] * a["dram_eff"])
    resident = max(k["blocks_per_sm"], 1) if k else 1
    waves = math.ceil(blocks / (resident * g["sms"]))
    t_lat = t_issue = cyc = 0.0
    loop = k and k["loop"]
    if loop and iters_per_warp:
        cyc = iteration_cycles(loop["_body"], k["_stream"], a["dram_ns"] * g["clock"] / 1e9, a["l2_ns"] * g["clock"] / 1e9)
        t_lat = waves * iters_per_warp * cyc / g["clock"]
        t_issue = loop["instructions"] * iters_per_warp * blocks * warps_per_block / (4 * g["sms"] * g["clock"])
    gap = a["gap_us"] if gap_us is None else gap_us
    fixed = chain * a["dram_ns"] * 1e-9 + extra_ns * 1e-9 + gap * 1e-6
    t = max(t_bw, t_lat, t_issue) + fixed
    bound = max((t_bw, "bandwidth"), (t_lat, "latency"), (t_issue, "issue"), (fixed, "launch+chain"))[1]
    little = None
    if loop and iters_per_warp and loop["stream_loads_before_first_use"]:
        warps = min(resident * warps_per_block, blocks * warps_per_block / g["sms"])
        little = warps * 32 * loop["stream_loads_before_first_use"] * loop["stream_load_width"] * g["sms"] / (a["dram_ns"] * 1e-9)
    return dict(us=t * 1e6, gap_us=gap, little_tbps=little and little / 1e12, bw_us=t_bw * 1e6, latency_us=t_lat * 1e6, issue_us=t_issue * 1e6, bound=bound,
                ns_per_iter_one_warp=cyc / g["clock"] * 1e9, bytes=bytes_, blocks=blocks, waves=waves, iters_per_warp=iters_per_warp)


def step(kernels, a, model, batch, keys, tp=1):
    """The kernels of one layer and of the head, as EmuDecoder::run_layers and the regression head
    launch them, each estimated; returns per-kernel rows and the per-step totals. tp > 1: one GPU of
    a tensor-parallel group (emu_fast.parallel): its heads and MLP slice, o and down computed as
    partial sums, each all-reduced (allreduce_us, an assumption) and then added (an ATen kernel)."""
    m, g, B, E = dict(MODELS[model]), a["gpu"], batch, 2  # bf16 bytes
    for key in ("heads", "kv_heads", "inter"):
        m[key] //= tp
    # a kernel of ours after one of ours: PDL needs sm_90 code (griddepcontrol); sm_80's launches are plain
    ours_gap = a["pdl_gap_us"] if a["pdl"] and a["arch"].startswith("sm_9") else a["gap_us"]
    H, I, Hq, Hkv, D = m["hidden"], m["inter"], m["heads"], m["kv_heads"], m["head_dim"]

    def gemv(label, n, kd, norm=False, silu=False):
        name, rows = gemv_name(kernels, B, norm, silu)
        k, lp = kernels[name], kernels[name]["loop"]
        w = n * kd * E
        # A block's 8 warps share its rows' weights: one row each (CUDA cores), or the K of 16 rows
        # split eight ways (tensor cores); bytes a warp streams / bytes it streams per loop trip.
        iters = math.ceil(rows * kd * E / 8 / (32 * lp["stream_bytes_per_lane"])) if lp else 0
        r = estimate(k, a, w + B * (kd + n) * E, math.ceil(n / rows), 8, iters,
                     KERNEL_CHAINS["gemv_norm" if norm else "gemv"], gap_us=ours_gap)
        return dict(kernel=label, instance=name, weight_bytes=w, **r)

    def simple(label, kind, bytes_, blocks):
        name = find(kernels, kind) if kind != "aten_small" else None
        r = estimate(kernels.get(name), a, bytes_, blocks, 8, 0, KERNEL_CHAINS[kind],
                     gap_us=a["gap_us"] if kind == "aten_small" else ours_gap)
        return dict(kernel=label, instance=name or "ATen elementwise", weight_bytes=0, **r)

    cap = math.ceil((keys + 1) / 128) * 128
    # decode_attention_splits: about blocks_per_sm blocks per SM, at most one split per split_rows rows
    splits = max(1, min(math.ceil(a["split_blocks_per_sm"] * g["sms"] / (B * Hkv)), math.ceil(cap / a["split_rows"])))
    chunk = max(16, (keys + splits) // splits)
    # decode_attention_kernel<T, D> today; <T, D, group> once the group is a template parameter.
    att = find(kernels, "attention", lambda n: re.search(rf"kernel<__nv_bfloat16, {D}(, {Hq // Hkv})?>", n))
    kv = 2 * keys * Hkv * D * E * B
    qkv_rows = 3 * Hq * D if Hq == Hkv else (Hq + 2 * Hkv) * D
    fused = a["fused_layer"]  # norms in the GEMV prologues, residual adds in their epilogues
    if fused:
        layer = [gemv("norm_gemv qkv", qkv_rows, H, norm=True)]
    else:
        layer = [simple("add_rms_norm (input)", "rms_norm", B * H * E * 4 + H * E, B), gemv("gemv qkv", qkv_rows, H)]
    merge_ns = 2 * a["l2_ns"] if splits > 1 and a["combine_folded"] else 0.0
    att_chain = KERNEL_CHAINS["attention"] - (CHAIN_BEFORE_WAIT["attention"] if ours_gap != a["gap_us"] else 0)
    r = estimate(kernels[att], a, kv, B * Hkv * splits, 4, math.ceil(min(chunk, keys) / 16), att_chain,
                 gap_us=ours_gap, extra_ns=merge_ns)
    layer.append(dict(kernel="decode_attention" + (" (+ last-split merge)" if merge_ns else ""), instance=att,
                      weight_bytes=0, kv_bytes=kv, **r))
    if splits > 1 and not a["combine_folded"]:
        layer.append(simple("attention combine", "combine", B * Hq * splits * (D + 2) * 4 + B * Hq * D * E, B * Hq))
    silu = simple("silu_mul", "silu_mul", B * I * E * 3, min(math.ceil(B * I / 256), 4096))
    if tp > 1:  # each partial sum all-reduced, then added to the residual stream
        def reduced(label):
            return [dict(kernel=f"all-reduce after {label} (NCCL, assumed)", instance="-", weight_bytes=0,
                         us=a["allreduce_us"], gap_us=0.0, bound="assumed"),
                    simple(f"h + {label} (ATen)", "aten_small", B * H * E * 3, 1)]
        layer += ([gemv("gemv o_proj (partial)", H, Hq * D)] + reduced("o_proj")
                  + [gemv("norm_gemv_silu gate_up", 2 * I, H, norm=True, silu=a["silu_epilogue"])]
                  + ([] if a["silu_epilogue"] else [silu])
                  + [gemv("gemv down (partial)", H, I)] + reduced("down"))
    elif fused and a["silu_epilogue"]:
        layer += [gemv("gemv_add o_proj", H, Hq * D), gemv("norm_gemv_silu gate_up", 2 * I, H, norm=True, silu=True),
                  gemv("gemv_add down", H, I)]
    elif fused:
        layer += [gemv("gemv_add o_proj", H, Hq * D), gemv("norm_gemv gate_up", 2 * I, H, norm=True), silu,
                  gemv("gemv_add down", H, I)]
    else:
        layer += [gemv("gemv o_proj", H, Hq * D), simple("add_rms_norm (post)", "rms_norm", B * H * E * 4 + H * E, B),
                  gemv("gemv gate_up", 2 * I, H), silu, gemv("gemv down", H, I)]
    head = [gemv("head (norm-fused gemv)", m["head"][0], m["head"][1], norm=True)]
    if m["up"]:
        head.append(gemv("project_up gemv", m["up"][0], m["up"][1]))
    smalls = ("lengths += 1 (ATen)", "positions (ATen)") if fused else ("h + branch (ATen)", "lengths += 1 (ATen)",
                                                                         "positions (ATen)")
    head += [simple(n, "aten_small", B * H * E * 3, 1) for n in smalls]
    if ours_gap != a["gap_us"]:  # the step's first kernel of ours follows an ATen kernel: a full gap
        head.append(dict(kernel="full launch gap of the step's first kernel (after ATen)", instance="-", weight_bytes=0,
                         us=a["gap_us"] - ours_gap, gap_us=a["gap_us"] - ours_gap, bound="launch"))
    weights = m["layers"] * sum(r["weight_bytes"] for r in layer) + sum(r["weight_bytes"] for r in head)
    total = m["layers"] * sum(r["us"] for r in layer) + sum(r["us"] for r in head)
    gaps = m["layers"] * sum(r["gap_us"] for r in layer) + sum(r["gap_us"] for r in head)
    kernels_per_step = m["layers"] * len(layer) + len(head) - (ours_gap != a["gap_us"])
    total_no_pdl = total - gaps + kernels_per_step * a["gap_us"]
    floor = weights / g["bw"] * 1e6
    allreduce_ms = m["layers"] * sum(r["us"] for r in layer if r["bound"] == "assumed") / 1e3
    return dict(model=model, batch=B, keys=keys, tp=tp, allreduce_ms=allreduce_ms, capacity=cap, splits=splits,
                layer=layer, head=head,
                kernels_per_step=kernels_per_step, kernels_per_layer=len(layer), step_ms=total / 1e3,
                step_ms_every_gap_full=total_no_pdl / 1e3,
                weight_bytes=weights, weight_floor_ms=floor / 1e3, fraction_of_floor=floor / total)


def quantized_gemvs(kernels, a, model, batch):
    """Issue 10's weight-only GEMVs (quantized_gemv.cuh) at the model's four projections, per
    scheme: each estimated like the bf16 GEMV (one row per warp), summed over the layers, beside
    the floor of reading their bytes (int8: 1 B a weight + a float32 scale a row; int4 g128: 0.5 B
    + a float32 scale per 128). Only the GEMVs: the norms, residual adds and SiLU around them are
    the step's and depend on how the decoder composes them."""
    m, g, B, E = MODELS[model], a["gpu"], batch, 2
    ours_gap = a["pdl_gap_us"] if a["pdl"] and a["arch"].startswith("sm_9") else a["gap_us"]
    H, I, Hq, Hkv, D = m["hidden"], m["inter"], m["heads"], m["kv_heads"], m["head_dim"]
    projections = [((Hq + 2 * Hkv) * D, H), (H, Hq * D), (2 * I, H), (H, I)]
    out = []
    for scheme, int4 in (("int8", False), ("int4", True)):
        inst = {}
        for n, k in kernels.items():
            mm = re.search(r"quantized_gemv_kernel<__nv_bfloat16, (\d+), (true|false)>", n)
            if k["kind"] == "qgemv" and mm and (mm[2] == "true") == int4:
                inst[int(mm[1])] = n
        if not inst:
            return []
        name = inst[min(b for b in inst if b >= min(B, max(inst)))]
        # bf16 takes the tensor-core kernel where the tree has one (quantized_mma_gemv.cuh: 16 rows
        # a block, K split over its 8 warps; batch <= 8 in one launch; int4 with group 128)
        tc = [n for n, k in kernels.items() if k["kind"] == "qgemv_mma" and
              re.search(rf"quantized_mma_gemv_kernel<__nv_bfloat16, {'true' if int4 else 'false'}>", n)] if B <= 8 else []
        rows = 16 if tc else 8
        name = tc[0] if tc else name
        k, lp = kernels[name], kernels[name]["loop"]
        us = floor = 0.0
        for n, kd in projections:
            wbytes = n * kd / 2 + n * math.ceil(kd / 128) * 4 if int4 else n * kd + n * 4
            per_warp = wbytes / n * (rows / 8)  # one row a warp (CUDA cores); 16 rows' K split 8 ways (mma)
            iters = math.ceil(per_warp / (32 * lp["stream_bytes_per_lane"])) if lp else 0
            r = estimate(k, a, wbytes + B * (kd + n) * E, math.ceil(n / rows), 8, iters, KERNEL_CHAINS["gemv"],
                         gap_us=ours_gap)
            us += r["us"]
            floor += wbytes / g["bw"] * 1e6
        out.append(dict(model=model, scheme=scheme, batch=B, instance=name, gemv_ms=us * m["layers"] / 1e3,
                        floor_ms=floor * m["layers"] / 1e3, fraction_of_floor=floor / us))
    return out


def markdown(reports, a):
    """The summary: per-arch kernel resources, per-kernel times of one layer, per-step totals."""
    gpus = "; ".join(f"{arch} code on {r['gpu']['name']} ({r['gpu']['bw'] / 1e12:.2f} TB/s, {r['gpu']['sms']} SMs, "
                     f"{r['gpu']['clock'] / 1e9:.2f} GHz)" for arch, r in reports.items())
    L = [f"# Static performance report: {LABEL}\n",
         f"Nothing here was measured: every figure is read from ptxas / nvdisasm output and a model. Modelled: {gpus}. "
         f"Source: `{a['source']}`. Regenerate: `python scripts/static_report.py` (see its docstring).\n",
         "## Model assumptions\n", "```", "The model" + __doc__.split("The model")[1].rstrip(), "```",
         f"Parameters: dram_ns={a['dram_ns']}, l2_ns={a['l2_ns']}, dram_eff={a['dram_eff']}, gap_us={a['gap_us']}, "
         f"pdl_gap_us={a['pdl_gap_us']}; the source: PDL launches {'yes' if a['pdl'] else 'no'}, attention combine "
         f"{'folded into the attention kernel' if a['combine_folded'] else 'a second kernel'}.\n"]
    for arch, rep in reports.items():
        L += [f"## Kernels, {arch} (bf16; ptxas -v and SASS main loop)\n",
              "| kernel | regs | spill st/ld B | smem B | blocks/SM | occupancy (limiter) | loop instr | stream loads/iter (width B) | stream loads issued before first use | instr per 16 B streamed |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        for n, k in rep["kernels"].items():
            lp = k["loop"] or {}
            ipb = (f"{lp['instructions'] * 16 / lp['stream_bytes_per_lane']:.1f}" if lp.get("stream_bytes_per_lane") else "-")
            L.append(f"| `{n.split('(')[0].replace('void emu_fast::cuda::', '')}` | {k['regs']} | {k['spill_stores']}/{k['spill_loads']} | "
                     f"{k['smem']} | {k['blocks_per_sm']} | {k['occupancy']:.0%} ({k['limiter']}) | {lp.get('instructions', '-')} | "
                     f"{lp.get('stream_loads', '-')} ({lp.get('stream_load_width', '-')}) | {lp.get('stream_loads_before_first_use', '-')} | {ipb} |")
        L.append("\nThe loop columns describe the loop the model uses for the GEMVs and decode attention; the "
                 "other kernels are timed from their bytes and KERNEL_CHAINS (rms_norm's loop is its >8192-wide "
                 "fall-back; its fast path is unrolled).\n")
    for arch, rep in reports.items():
        g = rep["gpu"]
        for model in MODELS:
            steps = [x for x in rep["steps"] if x["model"] == model and x["tp"] == 1]
            L += [f"## {model}, one layer and the head, per kernel, {arch} code on {g['name']}: us ({LABEL})\n",
                  "| kernel | " + " | ".join(f"batch {x['batch']}, {x['keys']} keys" for x in steps) + " |",
                  "|---" * (len(steps) + 1) + "|"]
            names = list(dict.fromkeys(r["kernel"] for x in steps for r in x["layer"] + x["head"]))
            for n in names:
                cells = []
                for x in steps:
                    r = next((r for r in x["layer"] + x["head"] if r["kernel"] == n), None)
                    cells.append(f"{r['us']:.1f} ({r['bound']})" if r else "-")
                L.append(f"| {n} | " + " | ".join(cells) + " |")
            L.append("| **one layer (sum of the layer rows above the head)** | " + " | ".join(f"**{sum(r['us'] for r in x['layer']):.1f}**" for x in steps) + " |")
            L.append("")
        if rep.get("quantized"):
            L += [f"## Weight-only int8 / int4 GEMVs (issue 10), {arch} code on {g['name']}: the four projections "
                  f"of every layer, ms per step ({LABEL})\n",
                  "| model | scheme | batch | kernel instance | GEMVs ms | their read floor ms | fraction of floor |",
                  "|---|---|---|---|---|---|---|"]
            for q in rep["quantized"]:
                L.append(f"| {q['model']} | {q['scheme']} | {q['batch']} | `{q['instance'].split('(')[0].replace('void emu_fast::cuda::', '')}` "
                         f"| {q['gemv_ms']:.2f} | {q['floor_ms']:.2f} | {q['fraction_of_floor']:.0%} |")
            L.append("")
        L += [f"## Per step, {arch} code on {rep['gpu']['name']} ({LABEL})\n",
              "| model | batch | keys | splits | kernels/layer | kernels/step | weight floor ms | estimated step ms | fraction of floor | step ms at gap_us for every kernel |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        for s in (s for s in rep["steps"] if s["tp"] == 1):
            L.append(f"| {s['model']} | {s['batch']} | {s['keys']} | {s['splits']} | {s['kernels_per_layer']} | "
                     f"{s['kernels_per_step']} | {s['weight_floor_ms']:.2f} | {s['step_ms']:.2f} | "
                     f"{s['fraction_of_floor']:.0%} | {s['step_ms_every_gap_full']:.2f} |")
        L.append("")
        tp_steps = [s for s in rep["steps"] if s["tp"] > 1]
        if tp_steps:
            one = {(s["model"], s["batch"], s["keys"]): s for s in rep["steps"] if s["tp"] == 1}
            L += [f"## Tensor parallelism, per step, {arch} code on {rep['gpu']['name']} ({LABEL})\n",
                  f"Each GPU reads its share of the weights; two all-reduces a layer at {a['allreduce_us']} us each "
                  "(an assumed NVLink latency for a [batch, hidden] bf16 all-reduce inside a CUDA graph; no GPU "
                  "measured it, and emu_fast's tensor-parallel step is not yet captured in a graph).\n",
                  "| model | batch | keys | GPUs | weights per GPU GB | estimated step ms | of which all-reduces ms | vs one GPU |",
                  "|---|---|---|---|---|---|---|---|"]
            for s in tp_steps:
                base = one[(s["model"], s["batch"], s["keys"])]
                L.append(f"| {s['model']} | {s['batch']} | {s['keys']} | {s['tp']} | {s['weight_bytes'] / 1e9:.1f} | "
                         f"{s['step_ms']:.2f} | {s['allreduce_ms']:.2f} | {base['step_ms'] / s['step_ms']:.2f}x |")
            L.append("")
    return "\n".join(L)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", action="append", choices=list(SM_LIMITS), help="repeatable; default sm_90a and sm_80")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks/results/static-report"),
                    help="prefix: writes <out>-<arch>.json and <out>.md")
    ap.add_argument("--kernels-source", default=ROOT, help="tree whose csrc/ is compiled (before/after)")
    ap.add_argument("--gpu", choices=list(GPUS), help="default: h100 for sm_90a, a100 for sm_80")
    ap.add_argument("--dram-ns", type=float, default=700.0, help="loaded DRAM latency (600-800 ns on H100)")
    ap.add_argument("--l2-ns", type=float, default=100.0, help="latency of a cached global load (x rows read by every warp: L1/L2 hits)")
    ap.add_argument("--dram-eff", type=float, default=0.92, help="fraction of peak a pure stream reaches")
    ap.add_argument("--gap-us", type=float, default=2.0, help="per-kernel launch gap + ramp inside a graph")
    ap.add_argument("--allreduce-us", type=float, default=8.0,
                    help="one small all-reduce over NVLink inside a graph, for the tensor-parallel rows (an assumption)")
    ap.add_argument("--pdl-gap-us", type=float, default=0.8,
                    help="the gap left between two of our kernels launched with PDL (an assumption)")
    args = ap.parse_args()
    a = dict(gpu=None, dram_ns=args.dram_ns, l2_ns=args.l2_ns, dram_eff=args.dram_eff, gap_us=args.gap_us,
             pdl_gap_us=args.pdl_gap_us, allreduce_us=args.allreduce_us, pdl=pdl_launches(args.kernels_source),
             combine_folded=combine_folded(args.kernels_source),
             source=describe(args.kernels_source), split_blocks_per_sm=split_rule(args.kernels_source)[0], split_rows=split_rule(args.kernels_source)[1],
             fused_layer=fused_layer(args.kernels_source), silu_epilogue=silu_epilogue(args.kernels_source))
    nvdisasm = find_tool("nvdisasm", "nvidia-cuda-nvdisasm")
    reports = {}
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.arch or ["sm_90a", "sm_80"]:
            kernels = kernel_table(arch, os.path.abspath(args.kernels_source), tmp, nvdisasm)
            a["gpu"] = GPUS[args.gpu or ("h100" if arch == "sm_90a" else "a100")]
            a["arch"] = arch
            steps = [step(kernels, a, m, b, keys) for m in MODELS for b in (1, 8) for keys in (160, 640)]
            steps += [step(kernels, a, m, b, 160, tp) for m in MODELS for b in (1, 8) for tp in (2, 4)]
            reports[arch] = dict(label=LABEL, arch=arch, gpu=a["gpu"], params={k: v for k, v in a.items() if k not in ("gpu", "arch")},
                                 kernels={n: {k: v for k, v in d.items() if not k.startswith("_")} | (
                                     dict(loop={k: v for k, v in d["loop"].items() if not k.startswith("_")}) if d["loop"] else {})
                                     for n, d in kernels.items()}, steps=steps,
                                 quantized=[q for m in MODELS for b in (1, 8) for q in quantized_gemvs(kernels, a, m, b)])
            path = f"{args.out}-{arch}.json"
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w") as f:
                json.dump(reports[arch], f, indent=1)
            print(f"wrote {path}")
    with open(f"{args.out}.md", "w") as f:
        f.write(markdown(reports, a))
    print(f"wrote {args.out}.md")
    for arch, rep in reports.items():
        for q in rep["quantized"]:
            print(f"{arch} {q['model']:9s} {q['scheme']} GEMVs batch {q['batch']}: {q['gemv_ms']:.2f} ms "
                  f"(their floor {q['floor_ms']:.2f}, {q['fraction_of_floor']:.0%}) [{LABEL}]")
        for s in rep["steps"]:
            tp = f" TP {s['tp']}" if s["tp"] > 1 else ""
            print(f"{arch} {s['model']:9s} batch {s['batch']} keys {s['keys']}{tp}: {s['step_ms']:.2f} ms "
                  f"(floor {s['weight_floor_ms']:.2f}, {s['fraction_of_floor']:.0%}; every gap full: "
                  f"{s['step_ms_every_gap_full']:.2f} ms; {s['kernels_per_layer']} kernels/layer) [{LABEL}]")


if __name__ == "__main__":
    main()
