"""Tensor parallelism (emu_fast.parallel, accelerate(model, tensor_parallel=group)): two gloo
processes on this CPU, started by the test with a deadline (tests/tp_worker.py), against the
same model run in one process. Each rank holds half of every layer and both return the same
images: float32 within 1e-5 of the single-process decoder (the ranks' partial sums add in
another order, nothing else differs), bfloat16 and quantized weights within the loop's own
tolerance against float32 on the same weights. emu_fast.Engine serves it with rank 0 scheduling
and the other ranks following. Refusals, a rank that dies and a rank that hangs end with errors,
never a hang. The sharding itself is checked in one process."""
import pytest
import torch

import emu_fast
from emu_fast.layer_weights import LayerWeights
from emu_fast.parallel import TensorParallel, shard_layer
from emu_fast.quant.schemes import INT4, INT8
from emu_fast.testing import rel_err, tiny_emu

import tp_worker
from decoder_setup import LOOP_TOL

# Float32 across the ranks: the two partial sums of o and down add in another order than one
# GEMV's (a few float32 ulps per layer); over the loop that stays far below 1e-5.
TP_FP32_TOL = 1e-5
# bfloat16 / quantized: each rank rounds its partial sum to the dtype before the all-reduce, so
# the loop is compared, as every bfloat16 loop is, with float32 on the same weights.
QUANTIZED_BF16_TOL = 8e-2  # tests/quant/test_quantized_decoder.py's bfloat16 loop tolerance


@pytest.fixture(scope="module")
def equal_results(tmp_path_factory):
    return tp_worker.launch("equal", tmp_path_factory.mktemp("tp_equal"))


@pytest.mark.parametrize("case", tp_worker.CASES, ids=tp_worker.case_name)
def test_two_ranks_reproduce_one_process(equal_results, case):
    name = tp_worker.case_name(case)
    kind, dtype, weights, _, _ = case
    for rank, result in enumerate(equal_results):
        assert "error" not in result, f"rank {rank}: {result['error']}"
        got = result[name]
        assert got["heads"] * 2 == 4  # each rank holds half the heads ...
        assert got["weight_bytes"] < 0.75 * got["whole_weight_bytes"]  # ... and about half the weights
        # one prompt, then a longer one (more positions), then three (more rows): the cache grew
        (b0, s0), (b1, s1), (b2, s2) = got["capacities"]
        assert s1 > s0 and b2 > b1, got["capacities"]
        for i, (split, alone) in enumerate(zip(got["split"], got["alone"])):
            assert split.shape == alone.shape
            if dtype == torch.float32:
                assert rel_err(split, alone) < TP_FP32_TOL, (name, i)
            else:
                tol = LOOP_TOL[dtype] if weights is None else QUANTIZED_BF16_TOL
                assert rel_err(split, got["truth"][i]) < tol, (name, i)
    # every rank returns the same images, bit for bit
    for a, b in zip(equal_results[0][name]["split"], equal_results[1][name]["split"]):
        assert torch.equal(a, b)


def test_refusals_and_different_prompts(tmp_path):
    results = tp_worker.launch("refusals", tmp_path)
    for rank, r in enumerate(results):
        assert "error" not in r, f"rank {rank}: {r['error']}"
        assert r["odd_heads"][0] == "ValueError" and "do not split over 2" in r["odd_heads"][1]
        assert r["int4_group_straddles"][0] == "ValueError" and "straddle" in r["int4_group_straddles"][1]
        assert r["int4_left_unquantized"], "the refused model was quantized anyway"
        # different prompts on the ranks: refused on every rank, before anything ran ...
        assert r["different_prompts"][0] == "ValueError" and "different inputs" in r["different_prompts"][1]
    # ... and the group still serves the next (same) request
    assert torch.equal(results[0]["after"], results[1]["after"])
    assert results[0]["after"].shape[1] == 16


@pytest.mark.parametrize("scenario", ["dead_rank", "hung_rank"])
def test_a_lost_rank_ends_the_other_with_an_error(tmp_path, scenario):
    r = tp_worker.launch(scenario, tmp_path, wait_for=(0,), deadline_s=120)[0]
    assert "error" not in r, r["error"]
    kind, message, seconds = r["step"]
    assert kind == "RuntimeError" and "tensor-parallel all-reduce" in message
    assert seconds < tp_worker.GROUP_TIMEOUT_S + 10  # the group's timeout, not forever
    kind, message, seconds = r["image"]
    assert kind == "RuntimeError" and "could not compare their inputs" in message


def test_engine_rank_0_schedules_the_others_follow(tmp_path):
    """Requests from three threads at staggered times, one too long for max_seq_len (it alone
    fails, on rank 0's future), an idle spell longer than the group's timeout (rank 0's
    heartbeats keep the follower waiting), then generate_image through the engine: every result
    equals its prompt generated alone in one process (the follower steps from its own outputs);
    the follower refuses requests and closes with rank 0, its rows rank 0's throughout."""
    leader, follower = tp_worker.launch("engine", tmp_path)
    for rank, r in enumerate((leader, follower)):
        assert "error" not in r, f"rank {rank}: {r['error']}"
    assert set(leader["results"]) == set(tp_worker.ENGINE_TEXTS)
    for text, got in leader["results"].items():
        assert rel_err(got, leader["alone"][text]) < TP_FP32_TOL, text
    assert rel_err(leader["again"], leader["alone"][tp_worker.ENGINE_TEXTS[1]]) < TP_FP32_TOL
    assert leader["bad"][0] == "ValueError" and "max_seq_len" in leader["bad"][1]
    assert leader["stats"]["completed"] == len(tp_worker.ENGINE_TEXTS) + 1 and leader["stats"]["failed"] == 1
    assert follower["refused"][0] == "RuntimeError" and "submit requests on rank 0" in follower["refused"][1]
    assert follower["closed"] and follower["group_error"] is None


def test_engine_stops_with_the_reason_when_a_follower_dies(tmp_path):
    r = tp_worker.launch("engine_dead_follower", tmp_path, wait_for=(0,), deadline_s=120)[0]
    assert "error" not in r, r["error"]
    assert r["first"].shape[1] == 8  # served while both ranks were there
    kind, message, _ = r["error_seen"]
    # refused (the engine had stopped on a heartbeat) or failed (it stopped under the request)
    assert kind in ("EngineClosed", "RuntimeError") and "tensor-parallel group failed" in message, (kind, message)
    assert r["closed"]


def test_a_self_check_failing_on_one_rank_moves_every_rank_to_aten(tmp_path):
    results = tp_worker.launch("self_check_one_rank", tmp_path, deadline_s=120)
    for rank, r in enumerate(results):
        assert "error" not in r, f"rank {rank}: {r['error']}"
        assert r["kernels"] == "aten", rank
        assert rel_err(r["got"], r["alone"]) < TP_FP32_TOL, rank
    assert "another tensor-parallel rank" in results[0]["reason"]
    assert "disagrees with the ATen step" in results[1]["reason"]


def test_not_a_group_is_refused():
    model = tiny_emu("emu1", n=4)
    with pytest.raises(TypeError, match="ProcessGroup"):
        emu_fast.accelerate(model, tensor_parallel="world")
    assert not hasattr(model, "emu_fast_decoder")


def _tp(rank, size=2):
    return TensorParallel(group=None, rank=rank, size=size, backends={"cpu": "gloo"}, name="test")


@pytest.mark.parametrize("scheme", [None, INT8, INT4], ids=["float", "int8", "int4"])
def test_shards_sum_to_the_whole_layer(scheme):
    """Each rank's q/k/v and gate/up rows are its heads' / its MLP slice's, and its o and down
    columns the matching inputs: concatenated, the rows are the whole projections' (GQA groups
    kept with their KV heads), and the ranks' partial o / down outputs sum to the whole output."""
    g = torch.Generator().manual_seed(0)
    heads, kv_heads, D, H, I, group = 4, 2, 16, 64, 128, 32
    dense = {"qkv": torch.randn((heads + 2 * kv_heads) * D, H, generator=g), "o": torch.randn(H, heads * D, generator=g),
             "gate_up": torch.randn(2 * I, H, generator=g), "down": torch.randn(H, I, generator=g)}
    if scheme is None:
        parts, deq = dict(dense), dict(dense)
    else:
        parts, deq = {}, {}
        for k, w in dense.items():
            q, s = scheme.quantize(w, group if scheme.grouped else None)
            parts[k], parts[f"{k}_scales"] = q, s
            deq[k] = scheme.dequantize(q, s, w.shape[1], group if scheme.grouped else None)
    layer = LayerWeights(input_norm=torch.ones(H), post_norm=torch.ones(H), **parts)
    shards = [shard_layer(layer, _tp(r), heads, kv_heads, D, I, scheme, group) for r in range(2)]

    def whole(shard, k, width):
        if scheme is None:
            return getattr(shard, k)
        return scheme.dequantize(getattr(shard, k), getattr(shard, f"{k}_scales"), width,
                                 group if scheme.grouped else None)

    x_attn, x_mlp = torch.randn(3, heads * D, generator=g), torch.randn(3, I, generator=g)
    o_sum = sum(x_attn[:, r * heads * D // 2:(r + 1) * heads * D // 2] @ whole(s, "o", heads * D // 2).t()
                for r, s in enumerate(shards))
    down_sum = sum(x_mlp[:, r * I // 2:(r + 1) * I // 2] @ whole(s, "down", I // 2).t() for r, s in enumerate(shards))
    torch.testing.assert_close(o_sum, x_attn @ deq["o"].t(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(down_sum, x_mlp @ deq["down"].t(), rtol=1e-5, atol=1e-4)
    q_rows = [whole(s, "qkv", H) for s in shards]
    per = heads * D // 2, kv_heads * D // 2
    for block, (start, size) in enumerate([(0, heads * D), (heads * D, kv_heads * D), ((heads + kv_heads) * D, kv_heads * D)]):
        offset = 0 if block == 0 else per[0] + (block - 1) * per[1]
        width = per[0] if block == 0 else per[1]
        got = torch.cat([rows[offset:offset + width] for rows in q_rows])
        torch.testing.assert_close(got, deq["qkv"][start:start + size], rtol=0, atol=0)
    gate_up = torch.cat([whole(s, "gate_up", H)[:I // 2] for s in shards] + [whole(s, "gate_up", H)[I // 2:] for s in shards])
    torch.testing.assert_close(gate_up, deq["gate_up"], rtol=0, atol=0)


def test_from_pretrained_reads_each_rank_its_share(tmp_path):
    """from_pretrained(tensor_parallel=group) on the Emu2-Gen folder: float, int8 and int4 quantized
    as loaded, and a saved int4 file cut as stored; each rank holds about half the weights and
    returns the one-process generator's images."""
    results = tp_worker.launch("loaded", tmp_path)
    for rank, r in enumerate(results):
        assert "error" not in r, f"rank {rank}: {r['error']}"
        assert set(r) == {"float", "int8", "int4", "int4-saved"}
        for weights, got in r.items():
            assert rel_err(got["split"], got["alone"]) < TP_FP32_TOL, (rank, weights)
            split_bytes, whole_bytes = got["bytes"]
            assert split_bytes < 0.75 * whole_bytes, (rank, weights)
    for weights in results[0]:
        assert torch.equal(results[0][weights]["split"], results[1][weights]["split"])


def test_decoder_refuses_a_tensor_parallel_setup_it_cannot_run():
    """The C++ decoder's own checks (what a hand-built decoder meets): a size without a group name,
    heads that do not split, a split model."""
    from emu_fast import _C
    from emu_fast.dropin.packing import pack_layers
    from emu_fast.testing import tiny_llama

    lm = tiny_llama(hidden=48, heads=3, kv_heads=3, seed=1)
    layers = pack_layers(lm)
    norm = lm.model.norm.weight.detach()
    head = torch.randn(48, 48)
    tables = torch.zeros(0, 8)

    def make(**kw):
        return _C.EmuDecoder(layers, norm, head, None, num_heads=3, num_kv_heads=3, rms_eps=1e-6, rope_cos=tables,
                             rope_sin=tables, rope_fn=lambda p: (torch.zeros(p, 8), torch.zeros(p, 8)), **kw)

    with pytest.raises(ValueError, match="needs tp_group"):
        make(tp_size=2)
    with pytest.raises(ValueError, match="do not split over 2"):
        make(tp_size=2, tp_group="0")
    with pytest.raises(ValueError, match="one device"):
        make(tp_size=3, tp_group="0", segment_starts=[0, 1])
    assert make().tp_size == 1 and make().tp_group == ""
