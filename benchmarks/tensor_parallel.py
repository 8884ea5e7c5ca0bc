"""Tensor parallelism measured: `torchrun --nproc-per-node N benchmarks/latency.py --tp N`.

Every rank builds the same random-weight model (latency.py's --shape / --kind / --dtype) and runs
emu_fast.accelerate(model, tensor_parallel=WORLD): each holds 1/N of every layer and reads only
that each step, with two all-reduces a layer. The baseline, in the same run, is the same model in
one process (rank 0) with every thread the ranks share between them (CPU: N processes x T/N
threads against 1 process x T threads; GPU: N GPUs against one), the other ranks waiting at a
barrier meanwhile. Interleaved repetitions, medians per image and per decode step; the images
are compared (the tensor-parallel result against the one-process one).

On a CPU the ranks share one memory bus and all-reduce through loopback TCP (gloo): the weights
each rank reads are halved, but the bus they are read over is not doubled, and every layer adds
two round trips through the kernel. Expect no speed-up there; the figures say how much it costs.
"""
from __future__ import annotations

import datetime
import json
import os
import statistics
import time
from pathlib import Path

import torch


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def run(args) -> dict:
    import torch.distributed as dist

    import emu_fast
    from benchmarks.methods import build_model, prompts, step_weights_bytes
    from emu_fast.dropin.accelerate import prompt_inputs
    from emu_fast.testing import rel_err

    cuda = args.device.startswith("cuda")
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=300))
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != args.tp:
        raise SystemExit(f"--tp {args.tp} needs {args.tp} processes (torchrun --nproc-per-node {args.tp}); got {world}")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        args.device = f"cuda:{local}"
    threads = max(1, args.threads)
    per_rank = max(1, threads // world)

    def fresh():  # the same weights on every rank and in every copy
        torch.manual_seed(0)
        return build_model(args)

    def decode_steps(decoder, embeds, mask, n):
        first = decoder.prefill(embeds, mask)
        return _timed(lambda: decoder.decode(first, n - 1), args.device)

    # The tensor-parallel model on every rank; the one-process baseline beside it on rank 0.
    tp_model = fresh()
    whole_bytes = step_weights_bytes(tp_model)
    texts = prompts(tp_model, args.batch, args.prompt_len)
    single = emu_fast.accelerate(fresh()) if rank == 0 else None
    emu_fast.accelerate(tp_model, tensor_parallel=dist.group.WORLD)
    n = tp_model._emu_fast_n
    tp_decoder = tp_model.emu_fast_decoder
    family = tp_model._emu_fast_family
    placeholder = family.signature().parameters["placeholder"].default
    embeds, mask = prompt_inputs(tp_model, texts, family.tokenizer(tp_model, None), None, placeholder)
    # What one all-reduce of a step's [B, H] partial output costs on this group (two a layer).
    partial = torch.zeros(args.batch, tp_decoder.hidden_size, dtype=getattr(torch, args.dtype), device=args.device)
    times = []
    for i in range(60):
        t = _timed(lambda: dist.all_reduce(partial), args.device)
        if i >= 10:
            times.append(t)
    all_reduce_s = statistics.median(times)
    baseline = {"image": [], "steps": []}
    split = {"image": [], "steps": []}
    reference = None
    got = None
    for rep in range(max(1, args.reps) + 1):  # the first repetition warms up (not counted)
        if rank == 0:
            torch.set_num_threads(threads)
            t_image = _timed(lambda: single.generate_image(texts), args.device)
            t_steps = decode_steps(single.emu_fast_decoder, embeds, mask, n)
            if rep:
                baseline["image"].append(t_image)
                baseline["steps"].append(t_steps / (n - 1))
            reference = single.generate_image(texts)
        dist.barrier()
        torch.set_num_threads(per_rank)
        box = {}
        t_image = _timed(lambda: box.setdefault("out", tp_model.generate_image(texts)), args.device)
        got = box["out"]
        t_steps = decode_steps(tp_decoder, embeds, mask, n)
        if rep:
            split["image"].append(t_image)
            split["steps"].append(t_steps / (n - 1))
        dist.barrier()
    result = None
    if rank == 0:
        med = {k: {m: statistics.median(v[m]) for m in ("image", "steps")} for k, v in (("one", baseline),
                                                                                          ("tp", split))}
        err = rel_err(got, reference)
        result = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "config": {k: v for k, v in vars(args).items() if k not in ("json", "plot")},
            "device": args.device, "world": world, "threads": threads, "threads_per_rank": per_rank,
            "backend": dist.get_backend(), "n": n, "step_weight_bytes": whole_bytes,
            "rank_weight_bytes": tp_decoder.weight_bytes, "one_process": med["one"], "tensor_parallel": med["tp"],
            "speedup_image": med["one"]["image"] / med["tp"]["image"],
            "speedup_step": med["one"]["steps"] / med["tp"]["steps"], "rel_err": err,
            "all_reduce_s": all_reduce_s, "all_reduces_per_step": 2 * tp_decoder.num_layers,
        }
        where = "GPUs" if cuda else "processes"
        print(f"tensor parallel | {args.shape} ({args.kind}) {args.dtype}, batch {args.batch}, n {n}, {args.device}")
        print(f"weights a step reads: {whole_bytes / 2**20:.1f} MiB in one process, "
              f"{tp_decoder.weight_bytes / 2**20:.1f} MiB per rank")
        print(f"{'':34} {'per image':>12} {'per step':>12}")
        print(f"{'1 process x ' + str(threads) + ' threads':34} {med['one']['image'] * 1e3:10.1f}ms "
              f"{med['one']['steps'] * 1e3:10.2f}ms")
        print(f"{f'{world} {where} x {per_rank} threads (TP)':34} {med['tp']['image'] * 1e3:10.1f}ms "
              f"{med['tp']['steps'] * 1e3:10.2f}ms")
        print(f"one all-reduce of [{args.batch}, {tp_decoder.hidden_size}] over {dist.get_backend()}: "
              f"{all_reduce_s * 1e6:.0f} us; {2 * tp_decoder.num_layers} a step: "
              f"{2 * tp_decoder.num_layers * all_reduce_s * 1e3:.2f} ms of each step")
        print(f"speed-up: {result['speedup_image']:.2f}x per image, {result['speedup_step']:.2f}x per step; "
              f"largest relative error of the TP images against one process: {err:.1e}")
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
            print(f"wrote {args.json}")
    dist.barrier()
    dist.destroy_process_group()
    return result
