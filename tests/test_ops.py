"""Each emu_fast op against the float32 reference (emu_fast.reference), over odd and even
shapes, float32 and bfloat16, ragged batches; torch.library.opcheck on each; bad arguments."""
import pytest
import torch

import emu_fast  # noqa: F401
from emu_fast import ops, reference

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"))]
DTYPES = [torch.float32, torch.bfloat16]
# (rtol, atol) against a float32 reference computed from the same (rounded) inputs.
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3)}


def close(actual, expected, dtype):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol)


def rand(*shape, dtype=torch.float32, device="cpu", scale=1.0):
    return (torch.randn(*shape) * scale).to(dtype=dtype, device=device)


# ------------------------------------------------------------------------------ splice


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,H", [(1, 1, 8), (2, 7, 33), (3, 16, 64)])
def test_splice_embeddings(device, dtype, B, T, H):
    torch.manual_seed(0)
    V, slot = 50, 49
    ids = torch.randint(0, V - 1, (B, T))
    ids[torch.rand(B, T) < 0.4] = slot
    n = int((ids == slot).sum())
    table, values = rand(V, H, dtype=dtype, device=device), rand(n, H, dtype=dtype, device=device)
    ids = ids.to(device)
    out = ops.splice_embeddings(ids, table, values, slot)
    assert out.dtype == dtype and out.shape == (B, T, H)
    # A copy: exact.
    torch.testing.assert_close(out, reference.splice_embeddings(ids, table, values, slot), rtol=0, atol=0)


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


def _attention_case(B, Hq, Hkv, D, S, lens, dtype, device, seed=0):
    torch.manual_seed(seed)
    qkv = rand(B, (Hq + 2 * Hkv) * D, dtype=dtype, device=device)  # slices of one fused projection
    q = qkv[:, : Hq * D].view(B, Hq, D)
    k = qkv[:, Hq * D:(Hq + Hkv) * D].view(B, Hkv, D)
    v = qkv[:, (Hq + Hkv) * D:].view(B, Hkv, D)
    k_cache = rand(B + 1, Hkv, S, D, dtype=dtype, device=device)
    v_cache = rand(B + 1, Hkv, S, D, dtype=dtype, device=device)
    cos, sin = reference.rope_tables(D, 2 * S, 10000.0)
    cache_lens = torch.tensor(lens, dtype=torch.long, device=device)
    positions = cache_lens + torch.arange(B, device=device) * 3  # left-pad offsets differ per row
    return q, k, v, k_cache, v_cache, cache_lens, positions, cos.to(device), sin.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,Hq,Hkv,D,S,lens", [
    (1, 4, 4, 16, 8, [0]),                 # empty cache: attends only to itself
    (1, 2, 2, 64, 40, [39]),               # last free slot
    (3, 6, 2, 32, 33, [5, 0, 17]),         # GQA, ragged
    (2, 8, 1, 128, 20, [11, 3]),           # MQA, head dim 128
    (4, 3, 3, 10, 9, [1, 2, 8, 4]),        # odd head count, small even head dim
])
def test_decode_attention(device, dtype, B, Hq, Hkv, D, S, lens):
    if device == "cuda" and D not in (64, 128):
        pytest.skip("the CUDA kernel takes head_dim 64 or 128 (test_cuda.py covers it)")
    args = _attention_case(B, Hq, Hkv, D, S, lens, dtype, device)
    q, k, v, kc, vc, cl, pos, cos, sin = args
    kc_ref, vc_ref = kc.clone(), vc.clone()
    scale = D ** -0.5
    expected = reference.decode_attention(q, k, v, kc_ref, vc_ref, cl, pos, cos, sin, scale)
    out = ops.decode_attention(q, k, v, kc, vc, cl, pos, cos, sin)
    assert out.shape == (B, Hq, D) and out.dtype == dtype
    close(out, expected, dtype)
    close(kc, kc_ref, dtype)
    torch.testing.assert_close(vc, vc_ref, rtol=0, atol=0)  # values are copied


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
    # the op still works after all that
    ops.decode_attention(q, k, v, kc, vc, cl, pos, cos, sin)


# ------------------------------------------------------------------------------ regression head and glue


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,Dout,up", [(1, 64, 64, False), (3, 33, 17, True), (5, 128, 40, True)])
def test_regression_head(device, dtype, B, H, Dout, up):
    torch.manual_seed(0)
    hidden = rand(B, H, dtype=dtype, device=device, scale=3)
    norm_w = (1 + 0.2 * torch.randn(H)).to(dtype=dtype, device=device)
    head = rand(Dout, H, dtype=dtype, device=device, scale=0.1)
    up_w = rand(H, Dout, dtype=dtype, device=device, scale=0.1) if up else None
    out, nxt = ops.regression_head(hidden, norm_w, 1e-6, head, up_w)
    ref_out, ref_next = reference.regression_head(hidden, norm_w, 1e-6, head, up_w)
    close(out, ref_out, dtype)
    assert nxt.shape == ((B, H) if up else (B, 0))
    if up:  # feed our own output to the reference up-projection: tests the GEMV, not rounding
        close(nxt, reference.gemv(out, up_w), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,K,N", [(1, 1, 1), (1, 512, 512), (2, 31, 65), (7, 100, 3), (16, 257, 129)])
def test_gemv(device, dtype, B, K, N):
    torch.manual_seed(0)
    x, w = rand(B, K, dtype=dtype, device=device), rand(N, K, dtype=dtype, device=device)
    close(ops.gemv(x, w), reference.gemv(x, w), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H", [(1, 8), (3, 33), (2, 512)])
def test_norms_and_silu(device, dtype, B, H):
    torch.manual_seed(0)
    x, r = rand(B, H, dtype=dtype, device=device, scale=2), rand(B, H, dtype=dtype, device=device)
    w = (1 + 0.2 * torch.randn(H)).to(dtype=dtype, device=device)
    close(ops.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6), dtype)
    normed, s = ops.add_rms_norm(x, r, w, 1e-5)
    ref_normed, ref_s = reference.add_rms_norm(x, r, w, 1e-5)
    close(normed, ref_normed, dtype)
    close(s, ref_s, dtype)
    gate_up = rand(B, 2 * H, dtype=dtype, device=device, scale=2)
    close(ops.silu_mul(gate_up), reference.silu_mul(gate_up), dtype)


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


# ------------------------------------------------------------------------------ opcheck


def _opcheck_cases(device):
    torch.manual_seed(0)
    ids = torch.tensor([[1, 3, 2, 3]], device=device)
    table = torch.randn(4, 6, device=device)
    yield "splice_embeddings", (ids, table, torch.randn(2, 6, device=device), 3)
    q, k, v, kc, vc, cl, pos, cos, sin = _attention_case(2, 4, 2, 8, 6, [1, 2], torch.float32, device)
    yield "decode_attention", (q.contiguous(), k.contiguous(), v.contiguous(), kc, vc, cl, pos, cos, sin, 0.35)
    h = torch.randn(2, 8, device=device)
    yield "regression_head", (h, torch.randn(8, device=device), 1e-6, torch.randn(5, 8, device=device),
                              torch.randn(8, 5, device=device))
    yield "regression_head", (h, torch.randn(8, device=device), 1e-6, torch.randn(5, 8, device=device), None)
    yield "gemv", (h, torch.randn(3, 8, device=device))
    yield "rms_norm", (h, torch.randn(8, device=device), 1e-6)
    yield "add_rms_norm", (h, torch.randn(2, 8, device=device), torch.randn(8, device=device), 1e-6)
    yield "silu_mul", (torch.randn(2, 8, device=device),)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for name, args in _opcheck_cases(device):
        torch.library.opcheck(getattr(torch.ops.emu_fast, name).default, args)


def test_decode_attention_rejects_zero_kv_heads_and_shared_caches():
    q, k, v, kc, vc, cl, pos, cos, sin = _attention_case(2, 4, 2, 8, 6, [1, 2], torch.float32, "cpu")
    empty_k = torch.randn(2, 0, 8)
    with pytest.raises(ValueError, match="at least one query and one KV head"):
        ops.decode_attention(q, empty_k, empty_k, torch.zeros(3, 0, 6, 8), torch.zeros(3, 0, 6, 8), cl, pos, cos, sin)
    with pytest.raises(ValueError, match="overlap in memory"):
        ops.decode_attention(q, k, v, kc, kc, cl, pos, cos, sin)


def test_fake_kernels_check_devices_and_shapes():
    """Meta tensors route to the fake kernels; a mix of devices or a bad shape fails there too."""
    with pytest.raises(ValueError, match="different devices"):
        ops.gemv(torch.randn(2, 4), torch.randn(3, 4, device="meta"))
    with pytest.raises(ValueError, match="does not match weight"):
        ops.gemv(torch.randn(2, 4, device="meta"), torch.randn(3, 5, device="meta"))
    with pytest.raises(ValueError, match="gate_up must be"):
        ops.silu_mul(torch.randn(2, 5, device="meta"))
    assert ops.gemv(torch.randn(2, 4, device="meta"), torch.randn(3, 4, device="meta")).shape == (2, 3)
