"""Property-based fuzzing (hypothesis) of the ops and the decoder: random shapes, dtypes,
strides and bad values for each op, random call sequences for EmuDecoder. Every call either
gives the reference result or raises ValueError/TypeError (IndexError for a token id outside
the table); never a crash, a hang or a wrong answer. Fixed seed (derandomize) and a small budget.

hypothesis is a test dependency (scripts/setup.sh installs it): without it this module fails
to import, loudly, rather than skipping."""
import hypothesis.strategies as st
import pytest
import torch
from hypothesis import HealthCheck, given, settings

from emu_fast import EmuDecoder, ops, reference
from emu_fast.testing import rel_err, tiny_llama

from op_samples import close

FUZZ = settings(derandomize=True, deadline=None, max_examples=200, database=None,
                suppress_health_check=list(HealthCheck))
GOOD = (torch.float32, torch.bfloat16)
DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float64, torch.float16, torch.int64])
REFUSED = (ValueError, TypeError)


def _tensor(shape, dtype, seed, transposed=False, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.int64:
        return torch.randint(-3, 3, shape, generator=g)
    if transposed and len(shape) == 2:  # same values, column-major strides
        return (torch.randn(shape[::-1], generator=g) * scale).to(dtype).t()
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def _refused_or(fn, expected_ok: bool):
    """Runs fn; a refusal must be a ValueError/TypeError, and only when the input is bad."""
    try:
        return fn()
    except REFUSED:
        if expected_ok:
            raise
        return None


@FUZZ
@given(B=st.integers(0, 4), K=st.integers(1, 40), N=st.integers(0, 20), dx=DTYPES, dw=DTYPES,
       transposed=st.booleans(), wrong_k=st.booleans(), seed=st.integers(0, 2**16))
def test_fuzz_gemv(B, K, N, dx, dw, transposed, wrong_k, seed):
    x = _tensor((B, K), dx, seed, transposed)
    w = _tensor((N, K + wrong_k), dw, seed + 1)
    ok = dx in GOOD and dw == dx and not wrong_k
    out = _refused_or(lambda: ops.gemv(x, w), ok)
    if ok:
        close(out, reference.gemv(x, w), dx)


@FUZZ
@given(B=st.integers(0, 4), H=st.integers(1, 40), dx=DTYPES, dw=DTYPES, residual=st.booleans(),
       bad_w=st.booleans(), bad_r=st.booleans(), transposed=st.booleans(), seed=st.integers(0, 2**16))
def test_fuzz_norms(B, H, dx, dw, residual, bad_w, bad_r, transposed, seed):
    x = _tensor((B, H), dx, seed, transposed)
    w = (1 + 0.1 * _tensor((H + bad_w,), torch.float32, seed + 1)).to(dw) if dw != torch.int64 else \
        torch.ones(H + bad_w, dtype=dw)
    if residual:
        r = _tensor((B + bad_r, H), dx, seed + 2)
        ok = dx in GOOD and dw == dx and not bad_w and not bad_r
        res = _refused_or(lambda: ops.add_rms_norm(x, r, w, 1e-6), ok)
        if ok:
            normed, s = res
            ref_normed, ref_s = reference.add_rms_norm(x, r, w, 1e-6)
            close(normed, ref_normed, dx)
            torch.testing.assert_close(s, ref_s, rtol=0, atol=0)
    else:
        ok = dx in GOOD and dw == dx and not bad_w
        out = _refused_or(lambda: ops.rms_norm(x, w, 1e-6), ok)
        if ok:
            close(out, reference.rms_norm(x, w, 1e-6), dx)


_EXTREME = st.one_of(st.floats(-10, 10), st.sampled_from([-1e30, -1e4, -200.0, -88.0, -87.0, 0.0, 1e4, 1e30]))


@FUZZ
@given(B=st.integers(0, 3), width=st.integers(1, 12), dtype=DTYPES, data=st.data())
def test_fuzz_silu_mul(B, width, dtype, data):
    gates = data.draw(st.lists(_EXTREME, min_size=B * width, max_size=B * width))
    ups = data.draw(st.lists(st.floats(-1e4, 1e4), min_size=B * width, max_size=B * width))
    if dtype == torch.int64:
        gate_up = torch.zeros(B, width, dtype=dtype)
    else:
        g = torch.tensor(gates, dtype=torch.float32).view(B, width)
        u = torch.tensor(ups, dtype=torch.float32).view(B, width)
        gate_up = torch.cat([g[:, : width - width // 2], u[:, : width // 2]], 1).to(dtype)  # [gate | up]
    ok = dtype in GOOD and width % 2 == 0
    out = _refused_or(lambda: ops.silu_mul(gate_up), ok)
    if ok:
        expected = reference.silu_mul(gate_up)
        assert torch.isfinite(out).all() == torch.isfinite(expected).all()
        close(out, expected, dtype)


@FUZZ
@given(B=st.integers(0, 3), H=st.integers(1, 24), Dout=st.integers(1, 12), up=st.booleans(), dtype=DTYPES,
       bad=st.sampled_from(["none", "norm", "head", "up"]), seed=st.integers(0, 2**16))
def test_fuzz_regression_head(B, H, Dout, up, dtype, bad, seed):
    hidden = _tensor((B, H), dtype, seed, scale=3)
    norm_w = _tensor((H + (bad == "norm"),), dtype, seed + 1)
    head = _tensor((Dout, H), dtype, seed + 2, transposed=bad == "head" and Dout > 1 and H > 1, scale=H ** -0.5)
    up_w = _tensor((H, Dout + (bad == "up")), dtype, seed + 3, scale=Dout ** -0.5) if up else None
    ok = dtype in GOOD and not (bad == "norm") and not (bad == "up" and up) and not (
        bad == "head" and Dout > 1 and H > 1)
    res = _refused_or(lambda: ops.regression_head(hidden, norm_w, 1e-6, head, up_w), ok)
    if ok:
        out, nxt = res
        close(out, reference.regression_head(hidden, norm_w, 1e-6, head, up_w)[0], dtype)
        if up:
            close(nxt, reference.gemv(out, up_w), dtype)


@FUZZ
@given(B=st.integers(0, 3), T=st.integers(1, 6), vocab=st.integers(1, 8), H=st.integers(1, 9),
       slots=st.integers(0, 4), extra=st.integers(-1, 1), bad_id=st.booleans(), float_ids=st.booleans(),
       dtype=DTYPES, seed=st.integers(0, 2**16))
def test_fuzz_splice_embeddings(B, T, vocab, H, slots, extra, bad_id, float_ids, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    slot_id = vocab - 1
    ids = torch.randint(0, vocab, (B, T), generator=g)
    if bad_id and B * T:
        ids.view(-1)[0] = vocab + 3
    n_slots = int((ids == slot_id).sum())
    table = _tensor((vocab, H), dtype, seed + 1)
    values = _tensor((max(n_slots + extra, 0), H), dtype, seed + 2)
    if float_ids:
        ids = ids.float()
    ok = dtype in GOOD + (torch.float16,) and not float_ids and not (bad_id and B * T) and values.shape[0] == n_slots
    try:
        out = ops.splice_embeddings(ids, table, values, slot_id)
    except (*REFUSED, IndexError):
        assert not ok
        return
    assert ok
    torch.testing.assert_close(out, reference.splice_embeddings(ids, table, values, slot_id), rtol=0, atol=0)


@FUZZ
@given(B=st.integers(0, 3), spare=st.integers(-1, 1), Hkv=st.integers(1, 3), group=st.integers(1, 3),
       D=st.integers(1, 9), S=st.integers(1, 6), dtype=DTYPES, data=st.data(),
       alias=st.sampled_from(["none", "q-in-k_cache", "lens-in-v_cache", "shared-caches"]),
       lens_dtype=st.sampled_from([torch.int64, torch.int64, torch.int32]), seed=st.integers(0, 2**16))
def test_fuzz_decode_attention(B, spare, Hkv, group, D, S, dtype, data, alias, lens_dtype, seed):
    Hq, P = Hkv * group, 2 * S
    rows = max(B + spare, 0)
    lens = data.draw(st.lists(st.integers(-1, S), min_size=B, max_size=B))
    pos = data.draw(st.lists(st.integers(-1, P), min_size=B, max_size=B))
    q, k, v = (_tensor((B, h, D), dtype, seed + i) for i, h in enumerate((Hq, Hkv, Hkv)))
    kc, vc = (_tensor((rows, Hkv, S, D), dtype, seed + 3 + i) for i in range(2))
    cos, sin = reference.rope_tables(2 * (D // 2) or 2, P, 10000.0)
    cos, sin = cos[:, : D // 2].contiguous(), sin[:, : D // 2].contiguous()
    cl, ps = torch.tensor(lens, dtype=lens_dtype), torch.tensor(pos, dtype=torch.int64)
    if alias == "q-in-k_cache" and kc.numel() >= q.numel() > 0:
        q = kc.view(-1)[: q.numel()].view(q.shape)
    elif alias == "lens-in-v_cache" and vc.numel() * vc.element_size() >= 8 * B > 0 and dtype != torch.int64:
        cl = vc.view(-1).view(torch.uint8)[: 8 * B].view(torch.int64)
        cl.copy_(torch.tensor(lens))
    elif alias == "shared-caches":
        vc = kc
    aliased = (alias == "q-in-k_cache" and q.numel() > 0 and q.data_ptr() == kc.data_ptr()) or \
              (alias == "lens-in-v_cache" and cl.data_ptr() == vc.data_ptr() and B > 0) or \
              (alias == "shared-caches" and kc.numel() > 0)
    meta_ok = (dtype in GOOD and D % 2 == 0 and B <= rows and cl.dtype == torch.int64 and not aliased)
    ok = meta_ok and all(0 <= n < S for n in lens) and all(0 <= p < P for p in pos)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    try:
        out = ops.decode_attention(q, k, v, kc, vc, cl, ps, cos, sin)
    except REFUSED:
        assert not ok
        # a refused call writes nothing (int64 lens aliased into a float cache read as NaN)
        torch.testing.assert_close(kc, kc_ref, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(vc, vc_ref, rtol=0, atol=0, equal_nan=True)
        # the fake kernel refuses metadata problems at trace time, as the CPU kernel does
        if not meta_ok and not aliased:
            with pytest.raises(REFUSED):
                ops.decode_attention(*(t.to("meta") for t in (q, k, v, kc, vc, cl, ps, cos, sin)))
        return
    assert ok
    expected = reference.decode_attention(q, k, v, kc_ref, vc_ref, cl, ps, cos, sin, D ** -0.5)
    close(out, expected, dtype)
    close(kc, kc_ref, dtype)
    torch.testing.assert_close(vc, vc_ref, rtol=0, atol=0)


# ------------------------------------------------------------------------------ the decoder

_LM = {}


def _model(kind):
    if kind not in _LM:
        lm = tiny_llama(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=40, seed=11)
        g = torch.Generator().manual_seed(12)
        d = 32 if kind == "emu1" else 12
        head = torch.randn(d, 32, generator=g) * 32 ** -0.5
        up = torch.randn(32, d, generator=g) * d ** -0.5 if kind == "emu2" else None
        _LM[kind] = (lm, head, up)
    return _LM[kind]


_CALL = st.one_of(
    st.tuples(st.just("prefill"), st.integers(0, 4), st.integers(1, 7),
              st.sampled_from(["ok", "ok", "two", "empty-row", "meta", "float"])),
    st.tuples(st.just("step"), st.sampled_from(["chain", "chain", "copy", "shape", "dtype"])),
    st.tuples(st.just("decode"), st.integers(-1, 4)),
    st.tuples(st.just("generate"), st.integers(0, 3)),
    st.tuples(st.just("reset")),
)


@settings(FUZZ, max_examples=120)
@given(kind=st.sampled_from(["emu1", "emu2"]), calls=st.lists(_CALL, min_size=1, max_size=6),
       seed=st.integers(0, 2**16))
def test_fuzz_decoder_call_sequences(kind, calls, seed):
    """Random prefill/step/decode/generate/reset sequences on a decoder with room for 3 prompts
    of 8 tokens: a refused call raises ValueError/TypeError and changes nothing; the outputs of a
    chain of accepted calls equal a fresh decoder's generate over the same prompts."""
    lm, head, up = _model(kind)
    dec = EmuDecoder.from_llama(lm, head, up, max_batch=3, max_seq_len=8)
    g = torch.Generator().manual_seed(seed)
    prompt = None   # (embeds, mask) of the active batch
    outs = []       # the chain of outputs since that prefill
    for call in calls:
        before = (dec.batch_size, dec.lengths)
        try:
            if call[0] == "prefill":
                _, B, T, how = call
                embeds = torch.randn(B, T, 32, generator=g) * 0.5
                mask = torch.ones(B, T, dtype=torch.long)
                if B and T > 1:
                    mask[0, : int(torch.randint(0, T - 1, (1,), generator=g))] = 0  # left padding
                if how == "two" and B:
                    mask[-1, -1] = 2
                elif how == "empty-row" and B:
                    mask[-1] = 0
                elif how == "meta":
                    mask = mask.to("meta")
                elif how == "float":
                    mask = mask.float()
                out = dec.prefill(embeds, mask)
                assert how == "ok" and 1 <= B <= 3 and T <= 8
                prompt, outs = (embeds, mask), [out]
            elif call[0] == "step":
                how = call[1]
                prev = outs[-1] if outs else torch.zeros(max(dec.batch_size, 1), head.shape[0])
                if how == "copy":
                    prev = prev.clone()
                elif how == "shape":
                    prev = prev[:, :-1]
                elif how == "dtype":
                    prev = prev.double()
                out = dec.step(prev)
                assert how in ("chain", "copy") and outs
                outs.append(out)
            elif call[0] == "decode":
                steps = call[1]
                prev = outs[-1] if outs else torch.zeros(max(dec.batch_size, 1), head.shape[0])
                res = dec.decode(prev, steps)
                assert outs and steps >= 0
                outs.extend(res.unbind(1))
            elif call[0] == "generate":
                n = call[1]
                embeds = torch.randn(2, 3, 32, generator=g) * 0.5
                mask = torch.ones(2, 3, dtype=torch.long)
                res = dec.generate(embeds, mask, n)
                assert n >= 1
                prompt, outs = (embeds, mask), list(res.unbind(1))
            else:
                dec.reset()
                prompt, outs = None, []
        except REFUSED:
            assert (dec.batch_size, dec.lengths) == before  # a refused call changes nothing
    if prompt is not None and outs:
        fresh = EmuDecoder.from_llama(lm, head, up, max_batch=3, max_seq_len=8)
        expected = fresh.generate(*prompt, len(outs))
        assert rel_err(torch.stack(outs, 1), expected) < 1e-4
