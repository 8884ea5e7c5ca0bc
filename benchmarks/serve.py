"""Serving benchmark: many users of one accelerated model, served three ways.

    python benchmarks/serve.py                       # CPU: the "small" shape
    python benchmarks/serve.py --device cuda --shape emu1-13b --dtype bfloat16

  one at a time    each request is its own generate_image call, behind a lock (what a service
                   without batching does)
  static batching  requests collected for up to --window seconds (at most --max-batch), then
                   one generate_image call for all of them; a request arriving meanwhile waits
                   for the whole batch
  emu_fast.Engine  in-flight batching: requests join and leave the running batch at every step

Closed loop: C clients (--clients), each sending its next request when the last one returns.
Open loop: requests arriving as a Poisson process at each of --rates requests per second.
Reported per point: images per second and p50 / p90 / p99 latency (arrival to result). Writes
JSON (--json) and a throughput-latency plot (--plot).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, List

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import emu_fast  # noqa: E402
from benchmarks.machine import describe, one_line  # noqa: E402
from benchmarks.methods import SHAPES, build_model, prompts  # noqa: E402

ONE, STATIC, ENGINE = "one at a time", "static batching", "emu_fast.Engine"
METHODS = (ONE, STATIC, ENGINE)


class OneAtATime:
    def __init__(self, model):
        self.model, self.lock = model, threading.Lock()

    def __call__(self, text: str) -> torch.Tensor:
        with self.lock:
            return self.model.generate_image([text])

    def close(self):
        pass


class StaticBatcher:
    """Collects requests for up to `window` seconds after the first (at most max_batch), then
    runs them as one generate_image call."""

    def __init__(self, model, max_batch: int, window: float):
        self.model, self.max_batch, self.window = model, max_batch, window
        self.cv = threading.Condition()
        self.waiting: List[tuple] = []
        self.closed = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def __call__(self, text: str) -> torch.Tensor:
        future: Future = Future()
        with self.cv:
            self.waiting.append((text, future))
            self.cv.notify()
        return future.result()

    def _run(self):
        while True:
            with self.cv:
                while not self.waiting and not self.closed:
                    self.cv.wait()
                if self.closed and not self.waiting:
                    return
                deadline = time.monotonic() + self.window
                while len(self.waiting) < self.max_batch and time.monotonic() < deadline:
                    self.cv.wait(max(0.0, deadline - time.monotonic()))
                batch, self.waiting = self.waiting[: self.max_batch], self.waiting[self.max_batch:]
            try:
                out = self.model.generate_image([t for t, _ in batch])
                for i, (_, f) in enumerate(batch):
                    f.set_result(out[i : i + 1])
            except Exception as e:  # noqa: BLE001 (the batch's requests carry it)
                for _, f in batch:
                    f.set_exception(e)

    def close(self):
        with self.cv:
            self.closed = True
            self.cv.notify()
        self.thread.join()


class EngineMethod:
    def __init__(self, model, max_queue: int, max_admit: int):
        self.engine = emu_fast.Engine(model, max_queue=max_queue, max_admit=max_admit)

    def __call__(self, text: str) -> torch.Tensor:
        return self.engine.submit(text).result()

    def close(self):
        self.engine.close()


def percentile(values: List[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


def summary(latencies: List[float], elapsed: float) -> Dict[str, float]:
    return dict(requests=len(latencies), images_per_s=len(latencies) / elapsed, p50_s=percentile(latencies, 0.5),
                p90_s=percentile(latencies, 0.9), p99_s=percentile(latencies, 0.99))


def closed_loop(serve: Callable, texts: List[str], clients: int, requests: int, progress) -> Dict[str, float]:
    latencies, lock, counter = [], threading.Lock(), iter(range(requests))

    def client(c):
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            t0 = time.perf_counter()
            serve(texts[i % len(texts)])
            with lock:
                latencies.append(time.perf_counter() - t0)
            progress.update(1)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return summary(latencies, time.perf_counter() - t0)


def open_loop(serve: Callable, texts: List[str], rate: float, requests: int, seed: int, progress) -> Dict[str, float]:
    rng, latencies, lock = random.Random(seed), [], threading.Lock()

    def one(i, arrival):
        serve(texts[i % len(texts)])
        with lock:
            latencies.append(time.perf_counter() - arrival)
        progress.update(1)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=min(requests, 256)) as pool:
        next_at = t0
        for i in range(requests):
            next_at += rng.expovariate(rate)
            time.sleep(max(0.0, next_at - time.perf_counter()))
            pool.submit(one, i, time.perf_counter())
    return summary(latencies, time.perf_counter() - t0)


def make(method: str, model, args):
    if method == ONE:
        return OneAtATime(model)
    if method == STATIC:
        return StaticBatcher(model, args.max_batch, args.window)
    return EngineMethod(model, max_queue=max(256, args.requests), max_admit=args.max_admit)


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for method in METHODS:
        closed = results["closed_loop"].get(method, [])
        axes[0].plot([p["images_per_s"] for p in closed], [p["p50_s"] for p in closed], marker="o", label=method)
        for p in closed:
            axes[0].annotate(str(p["clients"]), (p["images_per_s"], p["p50_s"]), fontsize=7)
        opened = results["open_loop"].get(method, [])
        axes[1].plot([p["rate"] for p in opened], [p["p90_s"] for p in opened], marker="o", label=method)
    axes[0].set(xlabel="images / s", ylabel="p50 latency (s)", title="closed loop (labels: clients)")
    axes[1].set(xlabel="arrival rate (requests / s)", ylabel="p90 latency (s)", title="open loop (Poisson arrivals)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(results["title"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def headline(results: dict, clients: int) -> dict:
    """The engine at `clients` concurrent clients (or the most measured, if not those) against the
    other two at the same load, and its p50 against an unloaded request's (one client, one at a
    time): what the serving goal reads."""
    closed = results["closed_loop"]
    if ENGINE not in closed or not closed[ENGINE]:
        return {}
    top = next((p for p in closed[ENGINE] if p["clients"] == clients), closed[ENGINE][-1])
    out = {"clients": top["clients"], "engine_images_per_s": top["images_per_s"], "engine_p50_s": top["p50_s"]}
    words = [f"{top['clients']} clients: engine {top['images_per_s']:.2f} images/s"]
    for method, key in ((ONE, "vs_one_at_a_time"), (STATIC, "vs_static_batching")):
        same = [p for p in closed.get(method, []) if p["clients"] == top["clients"]]
        if same:
            out[key] = top["images_per_s"] / same[0]["images_per_s"]
            words.append(f"{out[key]:.2f}x {method} ({same[0]['images_per_s']:.2f})")
    unloaded = [p for p in closed.get(ONE, []) if p["clients"] == 1]
    if unloaded:
        out["p50_vs_unloaded"] = top["p50_s"] / unloaded[0]["p50_s"]
        words.append(f"p50 {top['p50_s']:.3f} s = {out['p50_vs_unloaded']:.2f}x an unloaded request's "
                     f"({unloaded[0]['p50_s']:.3f} s)")
    out["text"] = "; ".join(words)
    return out


def parse_args(argv=None):
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if gpu else "cpu")
    p.add_argument("--shape", choices=SHAPES, default="emu1-13b" if gpu else "small")
    p.add_argument("--kind", choices=["emu1", "emu2"], default="emu1")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16" if gpu else "float32")
    p.add_argument("--n", type=int, default=None, help="embeddings per image (default: the family's)")
    p.add_argument("--prompt-len", type=int, default=40, help="approximate prompt tokens")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--rates", type=float, nargs="*", default=None,
                   help="open-loop arrival rates, requests/s (default: fractions of the engine's closed-loop peak)")
    p.add_argument("--requests", type=int, default=32, help="requests per point")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--window", type=float, default=0.05, help="static batching: seconds to collect a batch")
    p.add_argument("--max-admit", type=int, default=8, help="the engine's prompts prefilled per iteration at most")
    p.add_argument("--headline-clients", type=int, default=8, help="the closed-loop point the summary line compares")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--plot", metavar="PNG")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    from tqdm import tqdm

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(args)
    emu_fast.accelerate(model, max_batch=args.max_batch, max_seq_len=None)
    texts = prompts(model, 8, args.prompt_len)
    machine = describe(args.device)
    title = (f"{args.kind} {args.shape} {args.dtype} on {args.device}, n={model._emu_fast_n}, "
             f"~{args.prompt_len}-token prompts")
    results = dict(title=title, machine=machine, args=vars(args), closed_loop={}, open_loop={})
    points = len(args.methods) * (len(args.clients) + len(args.rates or [0.25, 0.5, 0.9])) * args.requests
    with tqdm(total=points, disable=args.no_progress, desc="serve", unit="req") as progress:
        model.generate_image(texts[:1])  # warm-up (and the self-check at batch 1)
        for method in args.methods:
            serve = make(method, model, args)
            try:
                serve(texts[0])  # warm-up
                results["closed_loop"][method] = [
                    dict(clients=c, **closed_loop(serve, texts, c, args.requests, progress)) for c in args.clients]
            finally:
                serve.close()
        peak = max((p["images_per_s"] for p in results["closed_loop"].get(ENGINE, [])), default=1.0)
        rates = args.rates or [round(f * peak, 3) for f in (0.25, 0.5, 0.9)]
        results["rates"] = rates
        for method in args.methods:
            serve = make(method, model, args)
            try:
                results["open_loop"][method] = [
                    dict(rate=r, **open_loop(serve, texts, r, args.requests, 0, progress)) for r in rates]
            finally:
                serve.close()
    print(title)
    print(one_line(machine))
    print(f"{'method':<18}{'point':>12}{'images/s':>10}{'p50 s':>9}{'p90 s':>9}{'p99 s':>9}")
    for loop, key in (("closed_loop", "clients"), ("open_loop", "rate")):
        for method, rows in results[loop].items():
            for p in rows:
                label = f"{p[key]} {'clients' if key == 'clients' else 'req/s'}"
                print(f"{method:<18}{label:>12}{p['images_per_s']:>10.2f}{p['p50_s']:>9.3f}{p['p90_s']:>9.3f}"
                      f"{p['p99_s']:>9.3f}")
    results["summary"] = headline(results, args.headline_clients)
    if results["summary"]:
        print(results["summary"]["text"])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    if args.plot:
        plot(results, args.plot)
    return results


if __name__ == "__main__":
    main()
