"""Loading an Emu checkpoint into a ready decoder: emu_fast.from_pretrained against the usual way
(build the hub class empty, Hugging Face accelerate's load_checkpoint_and_dispatch, then
emu_fast.accelerate(model, weights=...)), each in a fresh process, on a generated hub-layout
checkpoint of Emu2's width and reduced depth (random bf16 weights, safetensors shards: one for
the embeddings and heads, one per layer).

    python benchmarks/load.py                      # Emu2 width (6656 / 17920), 2 layers: ~2.6 GB
    python benchmarks/load.py --layers 4 --weights int8 --json out.json
    python benchmarks/load.py --quick              # a small shape, seconds (the tests run this)

Reports per method: seconds to a ready decoder, checkpoint GB read per second, the process's
peak resident host memory (and its growth over the interpreter's own), and on a GPU the peak
device memory, beside the checkpoint's size and its largest shard.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WRITE = """
import json, sys, torch
from safetensors.torch import save_file
torch.manual_seed(0)
folder, hidden, inter, layers, heads = sys.argv[1], *map(int, sys.argv[2:6])
cfg = dict(vocab_size=32004, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
           num_attention_heads=heads, rms_norm_eps=1e-6, d_model=1792 if hidden > 1792 else 64,
           vision_config=dict(n_query=64, v_query=64, width=1792 if hidden > 1792 else 64), model_type="emu")
json.dump(cfg, open(folder + "/config.json", "w"))
weight_map = {}
def shard(i, tensors):
    name = f"model.bf16-{i:05d}-of-{layers + 1:05d}.safetensors"
    save_file({k: v.bfloat16() for k, v in tensors.items()}, folder + "/" + name)
    weight_map.update({k: name for k in tensors})
p, d = "model.decoder.lm.model.", cfg["d_model"]
shard(1, {p + "embed_tokens.weight": torch.randn(32004, hidden) * 0.02, p + "norm.weight": torch.ones(hidden),
          "project_down.weight": torch.randn(d, hidden) * 0.02, "project_up.weight": torch.randn(hidden, d) * 0.02,
          "model.decoder.lm.lm_head.weight": torch.randn(32004, hidden) * 0.02,
          # the test models' stand-in vision tower (the real EVA-CLIP is ~1 GB more to skip)
          "model.visual.patch.weight": torch.randn(d, 12), "model.visual.patch.bias": torch.zeros(d)})
for i in range(layers):
    l = p + f"layers.{i}."
    t = {l + n: torch.ones(hidden) for n in ("input_layernorm.weight", "post_attention_layernorm.weight")}
    t.update({l + f"self_attn.{n}_proj.weight": torch.randn(hidden, hidden) * 0.02 for n in "qkvo"})
    t.update({l + "mlp.gate_proj.weight": torch.randn(inter, hidden) * 0.02,
              l + "mlp.up_proj.weight": torch.randn(inter, hidden) * 0.02,
              l + "mlp.down_proj.weight": torch.randn(hidden, inter) * 0.02})
    shard(i + 2, t)
json.dump({"metadata": {}, "weight_map": weight_map}, open(folder + "/model.safetensors.index.json", "w"))
"""

# One method, timed in its own process: prints one JSON line.
RUN = """
import json, resource, sys, time, torch
torch.set_num_threads(int(sys.argv[4]))
import emu_fast
from emu_fast.testing import TinyEmu2Hub
from emu_fast.testing.hub_llama import EmuConfig

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

method, folder, weights = sys.argv[1], sys.argv[2], (None if sys.argv[3] == "none" else sys.argv[3])
device = sys.argv[5]
before = rss()
start = time.perf_counter()
if method == "from_pretrained":
    gen = emu_fast.from_pretrained(folder, dtype=torch.bfloat16, weights=weights, device=device, progress=False)
    decoder = gen.decoder
else:
    import accelerate
    cfg = json.load(open(folder + "/config.json"))
    with accelerate.init_empty_weights():
        model = TinyEmu2Hub(EmuConfig(**{k: v for k, v in cfg.items() if k != "model_type"}))
    model = accelerate.load_checkpoint_and_dispatch(model, folder, device_map={"": device}, dtype=torch.bfloat16)
    emu_fast.accelerate(model, weights=weights)
    decoder = model.emu_fast_decoder
if device != "cpu":
    torch.cuda.synchronize()
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
out = {"seconds": seconds, "rss_before": before, "rss_peak": peak, "rss_after": rss(),
       "weight_bytes": decoder.weight_bytes}
if device != "cpu":
    out["device_peak"] = torch.cuda.max_memory_allocated()
print(json.dumps(out))
"""


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=6656)
    p.add_argument("--intermediate", type=int, default=17920)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=52)
    p.add_argument("--weights", default="int4", choices=["none", "int8", "int4"])
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--quick", action="store_true", help="hidden 512, intermediate 1536, 2 layers, 8 heads")
    p.add_argument("--folder", default=None, help="where to write the checkpoint (default: a temporary folder)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.quick:
        args.hidden, args.intermediate, args.layers, args.heads = 512, 1536, 2, 8
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.folder or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        subprocess.run([sys.executable, "-c", WRITE, str(folder), str(args.hidden), str(args.intermediate),
                        str(args.layers), str(args.heads)], check=True, env=env)
        shards = sorted(folder.glob("*.safetensors"))
        total, largest = sum(s.stat().st_size for s in shards), max(s.stat().st_size for s in shards)
        results = {}
        for method in ("from_pretrained", "dispatch+accelerate"):
            done = subprocess.run([sys.executable, "-c", RUN, method, str(folder), args.weights, str(args.threads),
                                   args.device], capture_output=True, text=True, env=env, cwd=ROOT)
            if done.returncode != 0:
                sys.exit(f"{method} failed:\n{done.stderr[-3000:]}")
            results[method] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"checkpoint: hub layout, hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, "
          f"bf16, {len(shards)} shards, {total / 1e9:.2f} GB (largest {largest / 1e9:.2f} GB); weights "
          f"{args.weights}, device {args.device}, {args.threads} threads")
    print(f"{'method':<22}{'seconds':>9}{'GB/s':>7}{'peak RSS GB':>13}{'RSS growth GB':>15}{'kept GB':>9}"
          + (f"{'device peak GB':>16}" if args.device != "cpu" else ""))
    for method, r in results.items():
        line = (f"{method:<22}{r['seconds']:>9.2f}{total / 1e9 / r['seconds']:>7.2f}{r['rss_peak'] / 1e9:>13.2f}"
                f"{(r['rss_peak'] - r['rss_before']) / 1e9:>15.2f}{(r['rss_after'] - r['rss_before']) / 1e9:>9.2f}")
        if args.device != "cpu":
            line += f"{r['device_peak'] / 1e9:>16.2f}"
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "checkpoint_bytes": total,
                                               "largest_shard_bytes": largest, "results": results}, indent=1))


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    main()
