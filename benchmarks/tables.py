"""benchmarks/latency.py's figures: each method's JSON row at a point (result tensors reduced
to their error against the reference), the table of a point and the tables of a sweep."""
from __future__ import annotations

from typing import List

from emu_fast.testing import rel_err

from benchmarks.methods import HF, QUANTIZED, UPSTREAM

# Largest relative error per output vector that still counts as "the same result": float32
# as the tests require; half precision rounds every op and the fed-back loop compounds it.
TOLERANCE = {"float32": 1e-4, "bfloat16": 0.1, "float16": 0.1}
# Other processes using more CPUs than this, on average, while a point was measured make its
# figures suspect (the benchmark's threads wait for cores): such points are marked.
BUSY = 0.25


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


def refraction(figs: dict, bandwidth: float) -> dict:
    for name, f in figs.items():
        if f.get("step_weight_read_GBps") and name not in QUANTIZED:  # (those have their own)
            f["fraction_of_bandwidth"] = f["step_weight_read_GBps"] * 1e9 / bandwidth
    return figs
