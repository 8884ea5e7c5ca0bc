"""Each emu_fast op against the float32 reference (emu_fast.reference) on every sample of
tests/op_samples.py (odd and even shapes, float32 and bfloat16, ragged batches), on the CPU and
on a GPU; torch.library.opcheck on each; bad arguments."""
import pytest
import torch

import emu_fast  # noqa: F401
from emu_fast import _C, ops

from op_samples import CPU_DTYPES, CUDA_DTYPES, attention_case, check, opcheck_samples, rand, samples

ON_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=ON_GPU)]


# ------------------------------------------------------------------------------ every op, every sample


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("sample", samples(), ids=str)
def test_op_matches_reference_cpu(sample, dtype):
    check(sample, getattr(ops, sample.op), sample.build("cpu", dtype), dtype)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("sample", [s for s in samples() if s.op == "decode_attention"], ids=str)
def test_decode_attention_generic_loops_match_reference_cpu(sample, dtype):
    """The generic C++ loops (processors without AVX2; head dims not a multiple of 16) at every
    sample's head dim, on a processor whose AVX2 loops would otherwise take most of them."""
    assert _C._set_cpu_isa("portable")
    try:
        check(sample, ops.decode_attention, sample.build("cpu", dtype), dtype)
    finally:
        _C._set_cpu_isa("")


@ON_GPU
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("sample", samples(cuda=True), ids=str)
def test_op_matches_reference_cuda(sample, dtype):
    if dtype == torch.float16 and sample.gpu_fp32_tol is None:
        pytest.skip("float16 runs the samples taken from test_cuda.py")
    check(sample, getattr(ops, sample.op), sample.build("cuda", dtype), dtype, gpu=True)


@pytest.mark.parametrize("op_and_args", list(opcheck_samples("cpu")), ids=lambda c: c[0])
def test_opcheck(op_and_args):
    """(tests/gpu/test_cuda.py runs the same samples through opcheck on a GPU.)"""
    name, args = op_and_args
    torch.library.opcheck(getattr(torch.ops.emu_fast, name).default, args)


# ------------------------------------------------------------------------------ splice


@pytest.mark.parametrize("device", DEVICES)
def test_splice_without_slots_is_embedding(device):
    ids = torch.tensor([[1, 2, 3], [4, 5, 3]], device=device)
    table = rand(6, 5, device=device)
    out = ops.splice_embeddings(ids, table, table.new_empty(0, 5), -1)
    torch.testing.assert_close(out, table[ids], rtol=0, atol=0)


def test_splice_rejects_bad_input():
    ids = torch.tensor([[1, 3, 3]])
    table = torch.randn(4, 6)
    with pytest.raises(ValueError, match="2 slots .* but 3 slot vectors"):
        ops.splice_embeddings(ids, table, torch.randn(3, 6), 3)
    with pytest.raises(ValueError, match="width 5"):
        ops.splice_embeddings(ids, table, torch.randn(2, 5), 3)
    with pytest.raises(IndexError, match="token id 9"):
        ops.splice_embeddings(torch.tensor([[1, 9]]), table, torch.randn(0, 6), 3)
    with pytest.raises(TypeError, match="int64"):
        ops.splice_embeddings(ids.int(), table, torch.randn(2, 6), 3)
    with pytest.raises(TypeError, match="slot_values"):
        ops.splice_embeddings(ids, table, torch.randn(2, 6, dtype=torch.float64), 3)
    with pytest.raises(ValueError, match="2-D"):
        ops.splice_embeddings(ids[0], table, torch.randn(2, 6), 3)


# ------------------------------------------------------------------------------ decode attention


def _attention_case(B, Hq, Hkv, D, S, lens, dtype, device):
    return attention_case(B, Hq, Hkv, D, S, lens, dtype, device, spare_slots=1)


def test_decode_attention_rejects_bad_input():
    q, k, v, kc, vc, cl, pos, cos, sin = _attention_case(2, 4, 2, 8, 6, [1, 2], torch.float32, "cpu")
    kc0 = kc.clone()
    with pytest.raises(ValueError, match="no room"):
        ops.decode_attention(q, k, v, kc, vc, torch.tensor([1, 6]), pos, cos, sin)
    with pytest.raises(ValueError, match="outside the RoPE table"):
        ops.decode_attention(q, k, v, kc, vc, cl, torch.tensor([0, 99]), cos, sin)
    torch.testing.assert_close(kc, kc0, rtol=0, atol=0)  # a rejected call writes nothing
    with pytest.raises(ValueError, match="multiple of"):
        ops.decode_attention(q[:, :3], k, v, kc, vc, cl, pos, cos, sin)
    with pytest.raises(TypeError, match="int64"):
        ops.decode_attention(q, k, v, kc, vc, cl.int(), pos, cos, sin)
    with pytest.raises(TypeError, match="k_cache"):
        ops.decode_attention(q, k, v, kc.double(), vc, cl, pos, cos, sin)
    with pytest.raises(ValueError, match="one entry per sequence"):
        ops.decode_attention(q, k, v, kc, vc, cl[:1], pos, cos, sin)
    with pytest.raises(ValueError, match="exceeds the cache's 3 slots"):
        q4, k4, v4 = (t.repeat(2, 1, 1) for t in (q, k, v))
        ops.decode_attention(q4, k4, v4, kc, vc, cl.repeat(2), pos.repeat(2), cos, sin)
    with pytest.raises(ValueError, match="contiguous heads"):
        ops.decode_attention(q.transpose(1, 2).contiguous().transpose(1, 2), k, v, kc, vc, cl, pos, cos, sin)
    # the split counters: int32, a vector, one per sequence and KV head (2 x 2 here), q's device
    with pytest.raises(TypeError, match="split_counters must be int32"):
        ops.decode_attention(q, k, v, kc, vc, cl, pos, cos, sin, split_counters=torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"one entry per sequence and KV head \(4\), got 3"):
        ops.decode_attention(q, k, v, kc, vc, cl, pos, cos, sin, split_counters=torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="contiguous vector"):
        ops.decode_attention(q, k, v, kc, vc, cl, pos, cos, sin, split_counters=torch.zeros(2, 2, dtype=torch.int32))
    with pytest.raises((ValueError, RuntimeError), match="different devices|device"):
        ops.decode_attention(q, k, v, kc, vc, cl, pos, cos, sin,
                             split_counters=torch.zeros(4, dtype=torch.int32, device="meta"))
    # the op still works after all that
    ops.decode_attention(q, k, v, kc, vc, cl, pos, cos, sin)


# ------------------------------------------------------------------------------ regression head and glue


def test_glue_rejects_bad_input():
    with pytest.raises(ValueError, match="inner sizes differ"):
        ops.gemv(torch.randn(2, 5), torch.randn(3, 4))
    with pytest.raises(TypeError, match="weight is torch.float64"):
        ops.gemv(torch.randn(2, 4), torch.randn(3, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        ops.gemv(torch.randn(2, 4).half(), torch.randn(3, 4).half())
    with pytest.raises(ValueError, match="does not match x"):
        ops.rms_norm(torch.randn(2, 4), torch.randn(5), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        ops.add_rms_norm(torch.randn(2, 4), torch.randn(3, 4), torch.randn(4), 1e-6)
    with pytest.raises(ValueError, match="odd"):
        ops.silu_mul(torch.randn(2, 5))
    with pytest.raises(ValueError, match="up_weight"):
        ops.regression_head(torch.randn(2, 4), torch.randn(4), 1e-6, torch.randn(3, 4), torch.randn(4, 5))
    with pytest.raises(ValueError, match="norm_gemv: norm_weight .* does not match x"):
        ops.norm_gemv(torch.randn(2, 4), torch.randn(5), 1e-6, torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"norm_gemv: x .* \(inner sizes differ\)"):
        ops.norm_gemv(torch.randn(2, 4), torch.randn(4), 1e-6, torch.randn(3, 5))
    with pytest.raises(TypeError, match="norm_gemv: norm_weight"):
        ops.norm_gemv(torch.randn(2, 4), torch.randn(4).double(), 1e-6, torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"gemv_add: residual \[2, 4\] is not \[2, 3\]"):
        ops.gemv_add(torch.randn(2, 4), torch.randn(3, 4), torch.randn(2, 4))
    with pytest.raises(TypeError, match="gemv_add: residual"):
        ops.gemv_add(torch.randn(2, 4), torch.randn(3, 4), torch.randn(2, 3).double())
    with pytest.raises(ValueError, match=r"norm_gemv_silu: gate_up_weight must be \[gate rows; up rows\]; its 3 rows"):
        ops.norm_gemv_silu(torch.randn(2, 4), torch.randn(4), 1e-6, torch.randn(3, 4))
    with pytest.raises(ValueError, match="norm_gemv_silu: norm_weight .* does not match x"):
        ops.norm_gemv_silu(torch.randn(2, 4), torch.randn(5), 1e-6, torch.randn(6, 4))
    with pytest.raises(ValueError, match=r"norm_gemv_silu: x .* \(inner sizes differ\)"):
        ops.norm_gemv_silu(torch.randn(2, 4), torch.randn(4), 1e-6, torch.randn(6, 5))
    with pytest.raises(TypeError, match="norm_gemv_silu: gate_up_weight"):
        ops.norm_gemv_silu(torch.randn(2, 4), torch.randn(4), 1e-6, torch.randn(6, 4).double())


def test_norm_gemv_silu_rounds_as_the_composition():
    """Bitwise silu_mul(norm_gemv(...)) on the CPU, every sample (the decode step relies on it)."""
    for dtype in CPU_DTYPES:
        for s in samples():
            if s.op == "norm_gemv_silu":
                x, norm_w, eps, w = s.build("cpu", dtype)
                torch.testing.assert_close(ops.norm_gemv_silu(x, norm_w, eps, w),
                                           ops.silu_mul(ops.norm_gemv(x, norm_w, eps, w)), rtol=0, atol=0)


def test_decode_attention_rejects_zero_kv_heads_and_shared_caches():
    q, k, v, kc, vc, cl, pos, cos, sin = _attention_case(2, 4, 2, 8, 6, [1, 2], torch.float32, "cpu")
    empty_k = torch.randn(2, 0, 8)
    with pytest.raises(ValueError, match="at least one query and one KV head"):
        ops.decode_attention(q, empty_k, empty_k, torch.zeros(3, 0, 6, 8), torch.zeros(3, 0, 6, 8), cl, pos, cos, sin)
    with pytest.raises(ValueError, match="overlap in memory"):
        ops.decode_attention(q, k, v, kc, kc, cl, pos, cos, sin)


def test_decode_attention_rejects_inputs_sharing_memory_with_the_caches():
    """The op appends to both caches: an input that is a view of one (q of k_cache, cache_lens
    of v_cache, ...) would be corrupted or steer the write out of bounds; each is refused, naming
    both arguments, before anything is written."""
    q, k, v, kc, vc, cl, pos, cos, sin = _attention_case(2, 4, 2, 8, 6, [1, 2], torch.float32, "cpu")
    kc0, vc0 = kc.clone(), vc.clone()
    q_in_kc = kc.view(-1)[: q.numel()].view(q.shape)
    with pytest.raises(ValueError, match="q and k_cache overlap in memory"):
        ops.decode_attention(q_in_kc, k, v, kc, vc, cl, pos, cos, sin)
    with pytest.raises(ValueError, match="k and v_cache overlap in memory"):
        ops.decode_attention(q, vc.view(-1)[-k.numel():].view(k.shape), v, kc, vc, cl, pos, cos, sin)
    lens_in_vc = vc.view(-1).view(torch.int64)[-2:]
    lens_in_vc.copy_(cl)
    vc0 = vc.clone()
    with pytest.raises(ValueError, match="cache_lens and v_cache overlap in memory"):
        ops.decode_attention(q, k, v, kc, vc, lens_in_vc, pos, cos, sin)
    with pytest.raises(ValueError, match="positions and k_cache overlap in memory"):
        ops.decode_attention(q, k, v, kc, vc, cl, kc.view(-1).view(torch.int64)[:2], cos, sin)
    with pytest.raises(ValueError, match="k_cache and v_cache overlap in memory"):
        ops.decode_attention(q, k, v, kc, kc, cl, pos, cos, sin)
    torch.testing.assert_close(kc, kc0, rtol=0, atol=0)
    torch.testing.assert_close(vc, vc0, rtol=0, atol=0)
    # views of one buffer that do not overlap are fine
    buf = torch.zeros(2, *kc.shape)
    buf[0].copy_(kc0)
    buf[1].copy_(vc0)
    ops.decode_attention(q, k, v, buf[0], buf[1], cl, pos, cos, sin)


def test_decode_attention_ignores_strides_of_size_one_dims_and_empty_tensors():
    """Strides of size-1 dims are arbitrary (a contiguous [B, 1, D] k may have strides
    (D, 1, 1)), and an empty batch has no layout at all: both are taken, with the same results."""
    q, k, v, kc, vc, cl, pos, cos, sin = _attention_case(2, 4, 1, 8, 6, [1, 2], torch.float32, "cpu")
    k1 = k.contiguous().as_strided(k.shape, (8, 1, 1))
    v1 = v.contiguous().as_strided(v.shape, (8, 1, 1))
    assert k1.is_contiguous() and k1.stride() == (8, 1, 1)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    expected = ops.decode_attention(q, k.contiguous(), v.contiguous(), kc_ref, vc_ref, cl, pos, cos, sin)
    out = ops.decode_attention(q, k1, v1, kc, vc, cl, pos, cos, sin)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(kc, kc_ref, rtol=0, atol=0)
    torch.testing.assert_close(vc, vc_ref, rtol=0, atol=0)
    # an empty batch with one KV head, whatever its strides
    q0 = torch.empty_strided((0, 4, 8), (1, 1, 1))
    k0 = torch.empty_strided((0, 1, 8), (1, 1, 1))
    out = ops.decode_attention(q0, k0, k0.clone(), kc, vc, cl[:0], pos[:0], cos, sin)
    assert out.shape == (0, 4, 8)
    torch.testing.assert_close(kc, kc_ref, rtol=0, atol=0)


def test_fake_kernels_check_devices_and_shapes():
    """Meta tensors route to the fake kernels; a mix of devices or a bad shape fails there too."""
    with pytest.raises(ValueError, match="different devices"):
        ops.gemv(torch.randn(2, 4), torch.randn(3, 4, device="meta"))
    with pytest.raises(ValueError, match="does not match weight"):
        ops.gemv(torch.randn(2, 4, device="meta"), torch.randn(3, 5, device="meta"))
    with pytest.raises(ValueError, match="gate_up must be"):
        ops.silu_mul(torch.randn(2, 5, device="meta"))
    assert ops.gemv(torch.randn(2, 4, device="meta"), torch.randn(3, 4, device="meta")).shape == (2, 3)


def _bad_calls():
    """(name, op, args) that every backend must refuse: the inputs the fake kernels used to let
    through."""
    q, k, v, kc, vc, cl, pos, cos, sin = _attention_case(2, 4, 2, 8, 6, [1, 2], torch.float32, "cpu")
    attn = (q, k, v, kc, vc, cl, pos, cos, sin)

    def swap(i, t):
        return tuple(t if j == i else a for j, a in enumerate(attn))

    odd = _attention_case(2, 2, 2, 7, 6, [1, 2], torch.float32, "cpu")  # head_dim 7 (the builder takes it)
    big = tuple(t.repeat(2, *[1] * (t.dim() - 1)) for t in (q, k, v))
    ids = torch.tensor([[1, 2]])
    table = torch.randn(4, 6)
    return [
        ("gemv-float64", ops.gemv, (torch.randn(2, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64))),
        ("rms_norm-int64", ops.rms_norm, (torch.ones(2, 4, dtype=torch.int64), torch.ones(4, dtype=torch.int64), 1e-6)),
        ("add_rms_norm-float64", ops.add_rms_norm, (torch.randn(2, 4).double(), torch.randn(2, 4).double(),
                                                    torch.randn(4).double(), 1e-6)),
        ("silu_mul-float64", ops.silu_mul, (torch.randn(2, 4, dtype=torch.float64),)),
        ("norm_gemv-norm-width", ops.norm_gemv, (torch.randn(2, 4), torch.randn(3), 1e-6, torch.randn(3, 4))),
        ("gemv_add-residual-shape", ops.gemv_add, (torch.randn(2, 4), torch.randn(3, 4), torch.randn(3, 2))),
        ("norm_gemv_silu-odd-rows", ops.norm_gemv_silu, (torch.randn(2, 4), torch.randn(4), 1e-6, torch.randn(5, 4))),
        ("regression_head-float64", ops.regression_head, (torch.randn(2, 4).double(), torch.randn(4).double(), 1e-6,
                                                          torch.randn(3, 4).double(), None)),
        ("regression_head-non-contiguous", ops.regression_head, (torch.randn(2, 4), torch.randn(4), 1e-6,
                                                                 torch.randn(4, 3).t(), None)),
        ("decode_attention-odd-head-dim", ops.decode_attention, odd),
        ("decode_attention-cache-dtype", ops.decode_attention, swap(3, kc.double())),
        ("decode_attention-int32-cache_lens", ops.decode_attention, swap(5, cl.int())),
        ("decode_attention-rope-width", ops.decode_attention, swap(7, cos[:, :3].contiguous())),
        ("decode_attention-batch-over-cache", ops.decode_attention, (*big, kc, vc, cl.repeat(2), pos.repeat(2), cos, sin)),
        ("decode_attention-q-in-k_cache", ops.decode_attention, swap(0, kc.view(-1)[: q.numel()].view(q.shape))),
        ("splice-float-ids", ops.splice_embeddings, (ids.float(), table, torch.randn(0, 6), 3)),
        ("splice-width", ops.splice_embeddings, (ids, table, torch.randn(0, 5), 3)),
    ]


def _to_meta(args):
    """args on meta, views kept as views of one meta storage where they share one on the CPU."""
    bases = {}
    out = []
    for a in args:
        if not isinstance(a, torch.Tensor):
            out.append(a)
            continue
        key = a.untyped_storage().data_ptr()
        if key not in bases:
            bases[key] = torch.empty(a.untyped_storage().nbytes(), dtype=torch.uint8, device="meta")
        base = bases[key]
        out.append(base.view(a.dtype)[: base.numel() // a.element_size()].as_strided(a.shape, a.stride(), a.storage_offset()))
    return out


@pytest.mark.parametrize("name,fn,args", _bad_calls(), ids=lambda c: c if isinstance(c, str) else "")
def test_fake_kernels_refuse_what_the_cpu_kernels_refuse(name, fn, args):
    """The fake (meta) kernels run the same C++ checks as the CPU kernels: each bad input raises
    the same error type, with the same message, at trace time rather than at run time."""
    with pytest.raises((ValueError, TypeError)) as cpu:
        fn(*args)
    with pytest.raises(cpu.type) as meta:
        fn(*_to_meta(args))
    assert str(meta.value) == str(cpu.value)

