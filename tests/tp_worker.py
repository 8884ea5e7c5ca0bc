"""The processes of the tensor-parallel tests (tests/parallel/): `launch` starts `world` processes
on this CPU (spawned, one thread each, a gloo group through a file store with a short timeout),
each runs one scenario below and saves what it saw; the test then asserts on what every rank
saved. A process that does not finish within the deadline is killed and reported, never waited
on forever."""
from __future__ import annotations

import copy
import datetime
import os
import time
import traceback
from pathlib import Path

import torch

GROUP_TIMEOUT_S = 15  # the gloo group's timeout: a hung rank must end the others within it


def launch(scenario: str, tmp_path: Path, world: int = 2, deadline_s: float = 240.0, wait_for=None) -> list:
    """Runs `scenario` on `world` spawned ranks; returns each rank's saved result (a dict), or
    {"error": ...} for a rank that raised, died or ran past the deadline. wait_for: the ranks to
    wait for (default all); the others are killed once those have ended."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    store = tmp_path / "store"
    procs = [ctx.Process(target=_main, args=(rank, world, str(store), scenario, str(tmp_path))) for rank in range(world)]
    for p in procs:
        p.start()
    end = time.monotonic() + deadline_s
    for rank in range(world) if wait_for is None else wait_for:
        procs[rank].join(max(0.0, end - time.monotonic()))
    results = []
    for rank, p in enumerate(procs):
        if p.is_alive():
            p.kill()
            p.join(10)
        path = tmp_path / f"rank{rank}.pt"
        if path.exists():
            results.append(torch.load(path, weights_only=False))
        else:
            results.append({"error": f"rank {rank} saved nothing (exit code {p.exitcode})"})
    return results


def _main(rank, world, store, scenario, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    result = {}
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))
        run = SCENARIOS[scenario]
        result = run(rank, world, dist.group.WORLD, out) if scenario == "loaded" else run(rank, world, dist.group.WORLD)
    except BaseException:  # noqa: BLE001 - reported to the test, which fails with it
        result = {"error": traceback.format_exc()}
    if result.get("exit_now"):
        os._exit(0)  # a rank that dies without a word
    torch.save(result, Path(out) / f"rank{rank}.pt")
    os._exit(0)  # not destroy_process_group: a dead peer must not hang the exit


# --- scenarios: each returns a dict of what the test asserts on -------------------------------

TEXTS = ["a photo of a cat", "an oil painting [<IMG_PLH>] of a dog riding a bicycle, at dawn", "a [<IMG_PLH>]"]
LONGER = [" ".join(["a watercolour of a lighthouse on a cliff above a stormy sea at night, with gulls and rain, "
                    "seen from a boat far below"] * 6)]  # past the cache's first 128 positions


def _image(count, dtype=torch.float32, seed=0):
    return torch.randn(count, 3, 8, 8, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _model(kind, dtype, **shape):
    from emu_fast.testing import tiny_emu, tiny_emu2_hub

    shape = {"kv_heads": 2, "intermediate": 128, "layers": 2, **shape}
    if kind == "hub":
        shape.pop("kv_heads")
        return tiny_emu2_hub(n=16, dtype=dtype, intermediate=shape["intermediate"], layers=shape["layers"])
    return tiny_emu(kind, n=8 if kind == "emu1" else 16, dtype=dtype, **shape)


def _generate(model, kind, texts, images):
    if kind == "hub":
        from emu_fast.testing import emu_tokenizer

        return model.generate_image(texts, emu_tokenizer(padding_side="left"), images)
    return model.generate_image(texts, images)


# (family, dtype, weights, group_size, how the step runs)
CASES = [
    ("emu1", torch.float32, None, None, "fused"),
    ("emu2", torch.float32, None, None, "fused"),
    ("hub", torch.float32, None, None, "fused"),
    ("emu1", torch.float32, None, None, "op_by_op"),
    ("emu2", torch.float32, "int8", None, "fused_2_threads"),
    ("emu2", torch.float32, None, None, "aten"),
    ("emu2", torch.float32, "int8", None, "fused"),
    ("emu1", torch.float32, "int4", 32, "fused"),
    ("emu2", torch.float32, "int4", 32, "op_by_op"),
    ("emu2", torch.bfloat16, None, None, "fused"),
    ("emu1", torch.bfloat16, "int8", None, "fused"),
]


def case_name(case) -> str:
    kind, dtype, weights, group, how = case
    return f"{kind}-{str(dtype).split('.')[-1]}-{weights or 'float'}{group or ''}-{how}"


def equal(rank, world, group):
    """Every case: the model's generate_image accelerated in one process, then over the group, on
    a ragged batch with prompt images, then a longer prompt (the cache grows)."""
    import emu_fast

    out = {}
    for case in CASES:
        kind, dtype, weights, group_size, how = case
        torch.manual_seed(0)
        model = _model(kind, dtype)
        kernels = "aten" if how == "aten" else "auto"
        emu_fast.accelerate(model, weights=weights, group_size=group_size, kernels=kernels)
        requests = [(TEXTS[:1], None), (LONGER, None), (TEXTS, _image(2, dtype))]  # the cache grows twice
        alone = [_generate(model, kind, t, i) for t, i in requests]
        whole_bytes = model.emu_fast_decoder.weight_bytes
        truth = None
        if dtype != torch.float32:  # the same weights (rounded, quantized) in float32, in one process
            # (the copy leaves the decoder behind: accelerate gives it its own)
            copied = copy.deepcopy(model, memo={id(model.emu_fast_decoder): None})
            reference = emu_fast.accelerate(copied.float(), kernels=kernels)
            truth = [_generate(reference, kind, t, None if i is None else i.float()) for t, i in requests]
        emu_fast.accelerate(model, tensor_parallel=group, kernels=kernels)
        decoder = model.emu_fast_decoder
        decoder.fused_cpu_step = how != "op_by_op"
        threads = 2 if how == "fused_2_threads" else 1  # the step's other threads wait out each all-reduce
        torch.set_num_threads(threads)
        split, capacities = [], []
        for t, i in requests:
            split.append(_generate(model, kind, t, i))
            capacities.append(decoder.capacity)
        torch.set_num_threads(1)
        out[case_name(case)] = {"alone": alone, "split": split, "truth": truth, "heads": decoder.num_heads,
                                "capacities": capacities,
                                "weight_bytes": decoder.weight_bytes, "whole_weight_bytes": whole_bytes,
                                "kernels": decoder.kernels}
    return out


def refusals(rank, world, group):
    """What each bad setup raises (type name, message, seconds), on every rank."""
    import emu_fast

    out = {}
    out["odd_heads"] = _caught(lambda: emu_fast.accelerate(_model("emu1", torch.float32, hidden=48, heads=3,
                                                                  kv_heads=3), tensor_parallel=group))
    refused = _model("emu1", torch.float32, intermediate=96)
    out["int4_group_straddles"] = _caught(lambda: emu_fast.accelerate(refused, weights="int4", group_size=32,
                                                                      tensor_parallel=group))
    from emu_fast.quant.apply import quantization_of

    out["int4_left_unquantized"] = quantization_of(refused) is None and not hasattr(refused, "emu_fast_decoder")
    model = _model("emu2", torch.float32)
    emu_fast.accelerate(model, tensor_parallel=group)
    # ranks asked for different prompts: refused on every rank, and the group stays usable
    out["different_prompts"] = _caught(lambda: model.generate_image([TEXTS[rank % 2]]))
    out["after"] = model.generate_image(TEXTS[:1])
    return out


def _caught(fn):
    """(exception type, message, seconds it took to come), or (None, None, seconds)."""
    t0 = time.monotonic()
    try:
        fn()
        return None, None, time.monotonic() - t0
    except Exception as e:  # noqa: BLE001 - the test checks the type and message
        return type(e).__name__, str(e), time.monotonic() - t0


def _mid_request(rank, group, leave, how):
    """Both ranks prefill a prompt; then rank 1 leaves (`leave`) and rank 0 steps, then asks for a
    whole image: what each raised, and how long it took."""
    import emu_fast
    from emu_fast.dropin.accelerate import prompt_inputs

    model = _model("emu1", torch.float32)
    emu_fast.accelerate(model, tensor_parallel=group)
    decoder = model.emu_fast_decoder
    decoder.fused_cpu_step = how == "fused"
    family = model._emu_fast_family
    embeds, mask = prompt_inputs(model, TEXTS[:1], family.tokenizer(model, None), None,
                                 family.signature().parameters["placeholder"].default)
    first = decoder.prefill(embeds, mask)
    if rank == 1:
        leave()
        return {"exit_now": True}
    return {"step": _caught(lambda: decoder.step(first)), "image": _caught(lambda: model.generate_image(TEXTS[:1]))}


def dead_rank(rank, world, group):
    """Rank 1 dies mid-request: rank 0's step and its next image raise at once, not hang."""
    return _mid_request(rank, group, lambda: None, "fused")


def hung_rank(rank, world, group):
    """Rank 1 stops answering mid-request: rank 0 raises within the group's timeout (op-by-op step)."""
    return _mid_request(rank, group, lambda: time.sleep(GROUP_TIMEOUT_S * 4), "op_by_op")


def loaded(rank, world, group, out_dir):
    """emu_fast.from_pretrained on the Emu2-Gen folder (and on a saved int4 file), in one process and
    as a rank reading its share: float, int8 and int4 as loaded, int4 pre-quantized."""
    import torch.distributed as dist

    import emu_fast
    from emu_fast.testing import tiny_emu2_hub
    from helpers import hub_folder

    root = Path(out_dir) / "checkpoint"
    if rank == 0:
        model = tiny_emu2_hub(n=16, intermediate=128)
        hub_folder(root, model)
    dist.barrier(group)
    folder = root / "Emu2-Gen"
    out = {}
    for weights in (None, "int8", "int4", "int4-saved"):
        kw = {} if weights is None else {"weights": weights[:4]} | ({"group_size": 32} if weights.startswith("int4") else {})
        path = folder
        if weights == "int4-saved":
            saved = root / "int4.safetensors"
            if rank == 0:
                emu_fast.from_pretrained(folder, dtype=torch.float32, **kw).save_quantized(saved)
            dist.barrier(group)
            path, kw = saved, {"tokenizer": folder / "tokenizer"}
        alone = emu_fast.from_pretrained(path, dtype=torch.float32, **kw)
        split = emu_fast.from_pretrained(path, dtype=torch.float32, tensor_parallel=group, **kw)
        out[weights or "float"] = {"alone": alone.generate_image(TEXTS[:2]), "split": split.generate_image(TEXTS[:2]),
                                   "bytes": (split.decoder.weight_bytes, alone.decoder.weight_bytes)}
    return out


ENGINE_TEXTS = ["a photo of a cat", "an oil painting of a dog riding a bicycle at dawn", "hi",
                "a red fox in tall grass under the evening sky", "a lighthouse", "two cats"]


def engine(rank, world, group):
    """emu_fast.Engine on a tensor-parallel model: rank 0 serves requests from three threads at
    staggered times (and one whose prompt is too long), idles past the group's timeout, then
    serves generate_image; rank 1 follows. Each result against the prompt generated alone in
    one process."""
    import threading

    import emu_fast

    model = _model("emu2", torch.float32)
    emu_fast.accelerate(model, max_seq_len=64)
    alone = {t: model.generate_image([t]) for t in ENGINE_TEXTS}
    emu_fast.accelerate(model, max_seq_len=64, tensor_parallel=group)
    eng = emu_fast.Engine(model, heartbeat=0.5)
    if rank != 0:
        refused = _caught(lambda: model.generate_image([ENGINE_TEXTS[0]]))  # requests go to rank 0
        eng.close()  # returns when rank 0's engine has closed
        error = eng._group_error  # None: rank 0 closed it (no broken group, no rows unlike rank 0's)
        return {"refused": refused, "closed": eng.closed, "group_error": None if error is None else repr(error)}
    futures = {}

    def client(texts, delay):
        time.sleep(delay)
        for t in texts:
            futures[t] = eng.submit(t)
            time.sleep(0.05)

    threads = [threading.Thread(target=client, args=(ENGINE_TEXTS[i::3], 0.1 * i)) for i in range(3)]
    for th in threads:
        th.start()
    too_long = eng.submit(" ".join(["word"] * 80))
    for th in threads:
        th.join()
    results = {t: f.result(timeout=120) for t, f in futures.items()}
    bad = _caught(lambda: too_long.result(timeout=120))
    time.sleep(GROUP_TIMEOUT_S + 2)  # idle: the heartbeat keeps the follower within the timeout
    again = model.generate_image([ENGINE_TEXTS[1]])  # generate_image goes through the engine
    stats = eng.stats()
    eng.close()
    return {"results": results, "alone": alone, "bad": bad, "again": again, "stats": stats}


def engine_dead_follower(rank, world, group):
    """Rank 1's follower dies after following one request: rank 0's engine stops and refuses or
    fails the next request with the reason."""
    import emu_fast

    model = _model("emu1", torch.float32)
    emu_fast.accelerate(model, tensor_parallel=group)
    eng = emu_fast.Engine(model, heartbeat=0.5)
    if rank == 1:
        deadline = time.monotonic() + 60
        while model.emu_fast_decoder.batch_size == 0 and time.monotonic() < deadline:
            time.sleep(0.01)  # until the first request's rows are admitted here too
        time.sleep(0.5)
        return {"exit_now": True}
    first = eng.submit(ENGINE_TEXTS[0]).result(timeout=GROUP_TIMEOUT_S * 3)
    time.sleep(3.0)
    t0 = time.monotonic()
    got = _caught(lambda: eng.submit(ENGINE_TEXTS[1]).result(timeout=GROUP_TIMEOUT_S * 3))
    return {"first": first, "error_seen": got, "seconds": time.monotonic() - t0, "closed": eng.closed}


def self_check_one_rank(rank, world, group):
    """A kernel wrong on rank 1 only (a test fault in its fused step): its first-step self-check
    fails, rank 0's passes; both fall back to the ATen step together (the ranks keep running the
    same collectives) and both images are right."""
    import emu_fast
    from emu_fast import _C

    model = _model("emu2", torch.float32)
    emu_fast.accelerate(model)
    alone = model.generate_image(TEXTS[:2])
    emu_fast.accelerate(model, tensor_parallel=group)
    if rank == 1:
        _C._set_test_fault("decode_step")
    try:
        got = model.generate_image(TEXTS[:2])
    finally:
        _C._set_test_fault("")
    decoder = model.emu_fast_decoder
    return {"alone": alone, "got": got, "kernels": decoder.kernels, "reason": decoder.fallback_reason}


SCENARIOS = {"self_check_one_rank": self_check_one_rank, "engine": engine, "engine_dead_follower": engine_dead_follower, "loaded": loaded, "equal": equal, "refusals": refusals, "dead_rank": dead_rank, "hung_rank": hung_rank}
