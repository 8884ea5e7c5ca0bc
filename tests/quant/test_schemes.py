"""The weight-only schemes (emu_fast.quant.schemes): int8 and int4 round-trip, int4's packing
layout, bad input refused, no subnormal scale written."""
import pytest
import torch

from emu_fast.quant.schemes import (dequantize_int4, dequantize_int8, pack_int4, quantize_int4,
                                    quantize_int8, unpack_int4)
from quant_samples import weight


@pytest.mark.parametrize("N,K", [(1, 1), (7, 33), (5, 128), (300, 129)])
def test_int8_round_trip(N, K):
    w = weight(N, K, zero_rows=[N - 1] if N > 1 else [])
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and q.shape == (N, K) and s.dtype == torch.float32 and s.shape == (N,)
    assert int(q.abs().max()) <= 127
    torch.testing.assert_close(s, w.abs().amax(1) / 127, rtol=0, atol=0)
    deq = dequantize_int8(q, s)
    assert torch.isfinite(deq).all()
    assert ((deq - w).abs() <= s[:, None] / 2 * (1 + 1e-6)).all()      # rounding to nearest
    nonzero = w.abs().amax(1) > 0
    assert (q[nonzero].abs().amax(1) == 127).all()                    # each row's largest entry hits 127
    if N > 1:  # a zero row: scale 0, dequantizes to zeros
        assert s[-1] == 0 and (q[-1] == 0).all() and (deq[-1] == 0).all()
    torch.testing.assert_close(dequantize_int8(q, s, torch.bfloat16), deq.to(torch.bfloat16), rtol=0, atol=0)


def test_int8_is_round_half_even_of_w_over_scale():
    w = torch.tensor([[127.0, 0.5, 1.5, -2.5, -127.0, 3.49]])
    q, s = quantize_int8(w)
    assert s.item() == 1.0
    assert q.tolist() == [[127, 0, 2, -2, -127, 3]]


def test_int4_packing_layout():
    """Block j of 32 values is bytes 16j..16j+15: byte i holds value 32j+i (low nibble) and
    32j+16+i (high nibble), each + 8; padding holds 8."""
    K = 40
    q = (torch.arange(K) % 15 - 7).to(torch.int8)[None]          # values -7..7
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (1, 32)
    for i in range(16):
        assert packed[0, i] == (int(q[0, i]) + 8) | ((int(q[0, 16 + i]) + 8) << 4)
    for i in range(16):  # the second block holds values 32..39 then padding
        lo = int(q[0, 32 + i]) + 8 if 32 + i < K else 8
        assert packed[0, 16 + i] == lo | (8 << 4)
    full = torch.randint(-8, 8, (5, 77), dtype=torch.int8)
    assert torch.equal(unpack_int4(pack_int4(full), 77), full)


@pytest.mark.parametrize("N,K,G", [(1, 1, 32), (7, 45, 32), (4, 200, 128), (3, 256, 128), (300, 130, 64)])
def test_int4_round_trip(N, K, G):
    w = weight(N, K, zero_rows=[0] if N > 1 else [])
    if K > G:
        w[-1, G:] = 0                                             # a zero group in a nonzero row
    q, s = quantize_int4(w, G)
    groups = -(-K // G)
    assert q.dtype == torch.uint8 and q.shape == (N, -(-K // 32) * 16)
    assert s.dtype == torch.float32 and s.shape == (N, groups)
    values = unpack_int4(q, K)
    assert int(values.min()) >= -7 and int(values.max()) <= 7
    deq = dequantize_int4(q, s, K, G)
    per_input = s.repeat_interleave(G, 1)[:, :K]
    assert torch.isfinite(deq).all()
    assert ((deq - w).abs() <= per_input / 2 * (1 + 1e-6)).all()
    padded = torch.zeros(N, groups * G)
    padded[:, :K] = w
    torch.testing.assert_close(s, padded.view(N, groups, G).abs().amax(2) / 7, rtol=0, atol=0)
    if N > 1:
        assert (s[0] == 0).all() and (deq[0] == 0).all()
    if K > G:
        assert (s[-1, 1:] == 0).all() and (deq[-1, G:] == 0).all()
    if K % 32:  # padding nibbles are 8 (value 0)
        tail = K % 32
        last = q[:, -16:]
        lows_pad = last[:, tail:] & 15 if tail < 16 else last[:, :0]
        assert (lows_pad == 8).all()
        assert ((last[:, max(0, tail - 16):] >> 4) == 8).all()


def test_quantize_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        quantize_int8(torch.randn(5))
    with pytest.raises(TypeError, match="floating-point"):
        quantize_int8(torch.ones(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize_int4(torch.tensor([[1.0, float("nan")]]))
    for bad in (48, 0, -32, True, 64.0):
        with pytest.raises(ValueError, match="multiple of 32"):
            quantize_int4(torch.randn(2, 64), bad)


@pytest.mark.parametrize("tiny", [1e-36, 1e-38, 1e-40, 1e-42])
def test_quantizer_writes_no_subnormal_scale(tiny):
    """Weights so small that max|w| / qmax would be subnormal get the smallest normal scale
    (2^-126) instead, so every scale the quantizer writes loads; each weight stays within half a
    scale of its value and tiny nonzero rows keep a nonzero scale."""
    w = weight(4, 100, seed=2) * tiny
    w[0] = 0
    for q, s, deq, span in [(*quantize_int8(w), None, None), (*quantize_int4(w, 32), None, 32)]:
        deq = dequantize_int8(q, s) if span is None else dequantize_int4(q, s, 100, 32)
        assert ((s == 0) | (s >= torch.finfo(torch.float32).tiny)).all() and (s[1:] > 0).all()
        assert (s[0] == 0).all()
        per_input = s[:, None] if span is None else s.repeat_interleave(32, 1)[:, :100]
        assert ((deq.double() - w.double()).abs() <= per_input.double() / 2 * (1 + 1e-6)).all()
