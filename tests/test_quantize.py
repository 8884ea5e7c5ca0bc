"""Weight-only int8 / int4 (issue 10, phase 1): the schemes (emu_fast.quantize) round-trip, the
CPU ops gemv_int8 / gemv_int4 match the pure-PyTorch reference on every instruction set this
processor has, opcheck, bad input, the quantized modules, quantizing a tiny Emu1/Emu2 model
(its Hugging Face forward against the same model with the dequantized weights put back; the
original weights released layer by layer) and save -> load."""
import copy
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import emu_fast
from emu_fast import _C, ops, reference
from emu_fast import quantized_linear as ql
from emu_fast.model_checks import LAYER_LINEARS
from emu_fast.quantize import (dequantize_int4, dequantize_int8, pack_int4, quantize_int4, quantize_int8,
                               round_inputs_to_int8, round_inputs_to_int16, unpack_int4)
from emu_fast.quantized_io import load_quantized, quantized_state_dict, save_quantized
from emu_fast.quantized_linear import Int4Linear, Int8Linear, quantize_decoder_linears_
from emu_fast.testing import rel_err, tiny_emu

ISAS = ["avx512", "avx2", "portable"]


def available_isas():
    """The instruction sets this processor runs (the hook refuses the others), best first."""
    have = []
    try:
        for isa in ISAS:
            if _C._set_quantized_gemv_isa(isa):
                have.append(isa)
    finally:
        _C._set_quantized_gemv_isa("")
    return have


def with_isa(isa, fn):
    assert _C._set_quantized_gemv_isa(isa)
    try:
        return fn()
    finally:
        _C._set_quantized_gemv_isa("")


def weight(N, K, seed=0, zero_rows=(), scale=None):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * (scale or K ** -0.5)
    for n in zero_rows:
        w[n] = 0
    return w


# ------------------------------------------------------------------------------ the schemes


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


# ------------------------------------------------------------------------------ the ops


OP_SHAPES = [  # (B, K, N, group): odd sizes, K not a multiple of the group / of 32 / of 8, B up to 32
    (1, 1, 1, 32), (1, 5120, 40, 128), (3, 77, 13, 32), (2, 300, 9, 64), (5, 129, 7, 128),
    (16, 257, 33, 256), (4, 1000, 17, 128), (32, 64, 6, 32), (2, 8, 3, 32),
]


def op_case(B, K, N, G, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, K, generator=g).to(dtype)
    w = weight(N, K, seed=seed + 1, zero_rows=[N - 1] if N > 2 else [])
    return x, quantize_int8(w), quantize_int4(w, G)


def check_against_reference(out, x, w_deq):
    """out = x @ w_deq^T computed in float64, to float32 accumulation error (float32 out) or
    one bfloat16 rounding of it (bfloat16 out)."""
    expected = x.double() @ w_deq.double().t()
    assert out.dtype == x.dtype and out.shape == expected.shape
    bound = 1e-5 * (x.double().abs() @ w_deq.double().abs().t()) + 1e-6   # |sum| of |terms|: float32 rounding
    if x.dtype == torch.bfloat16:
        bound = bound + expected.abs() * 2.0 ** -8
    err = (out.double() - expected).abs()
    assert (err <= bound).all(), float((err - bound).max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B,K,N,G", OP_SHAPES, ids=lambda v: str(v))
def test_ops_match_reference_on_every_isa(B, K, N, G, dtype):
    x, (q8, s8), (q4, s4) = op_case(B, K, N, G, dtype)
    w8, w4 = dequantize_int8(q8, s8), dequantize_int4(q4, s4, K, G)
    results = {}
    for isa in available_isas():
        y8 = with_isa(isa, lambda: ops.gemv_int8(x, q8, s8))
        y4 = with_isa(isa, lambda: ops.gemv_int4(x, q4, s4, G))
        check_against_reference(y8, x, w8)
        check_against_reference(y4, x, w4)
        results[isa] = (y8, y4)
    # the default (best) path is one of those, and the float32 reference agrees
    torch.testing.assert_close(ops.gemv_int8(x, q8, s8), results[available_isas()[0]][0], rtol=0, atol=0)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(ops.gemv_int4(x, q4, s4, G).float(), reference.gemv_int4(x, q4, s4, G).float(), **tol)
    torch.testing.assert_close(ops.gemv_int8(x, q8, s8).float(), reference.gemv_int8(x, q8, s8).float(), **tol)


# ------------------------------------------------------------------------------ int16 inputs
# bfloat16 activations reach the CPU kernels as int16 blocks (emu_fast.quantize.round_inputs_to_int16);
# the test hook _set_quantized_input forces that path on float32 inputs, whose float32 outputs
# can then be held to the exact oracle: the rounded inputs times the dequantized weights.


def with_input(mode, fn):
    _C._set_quantized_input(mode)
    try:
        return fn()
    finally:
        _C._set_quantized_input("")


def int16_case_x(B, K, seed):
    """Blocks of 64 inputs at very different scales: ordinary, an outlier block, tiny (below
    2^-112: the kernels' scalar rounding), zeros; and an input that rounds to 2^15 steps (clamped)."""
    g = torch.Generator().manual_seed(seed)
    block_scale = torch.tensor([1.0, 1e3, 1e-36, 0.0, 3e-3])[torch.arange(-(-K // 64)) % 5]
    x = torch.randn(B, K, generator=g) * block_scale.repeat_interleave(64)[:K]
    x[0, 1:64] = x[0, 1:64].clamp(-0.9, 0.9)
    x[0, 0] = 1 - 2.0 ** -20  # the largest of its block: 32767.97 steps, clamped to 32767
    return x


def test_int16_oracle_rounding():
    x = torch.tensor([[1 - 2.0 ** -20, 0.5, -0.75, 2.0 ** -16, 3 * 2.0 ** -16, 3 * 2.0 ** -18, -1.25 * 2.0 ** -15]])
    # max < 2^0: step 2^-15; 32767.97 steps -> clamped to 32767; 0.5 and 1.5 steps -> 0 and 2 (half
    # to even); 0.375 -> 0; -1.25 -> -1
    expected = torch.tensor([[32767 * 2.0 ** -15, 0.5, -0.75, 0.0, 2 * 2.0 ** -15, 0.0, -2.0 ** -15]],
                            dtype=torch.float64)
    assert torch.equal(round_inputs_to_int16(x), expected)
    # every bfloat16 input at least 2^-7 of its block's largest is exact (and not all smaller ones)
    b = (torch.randn(4, 200) * torch.logspace(-3, 3, 200)).bfloat16().float()
    block_max = torch.nn.functional.pad(b.abs(), (0, 56)).unflatten(-1, (-1, 64)).amax(-1)
    near = b.abs() >= 2.0 ** -7 * block_max.repeat_interleave(64, -1)[:, :200]
    assert torch.equal(round_inputs_to_int16(b)[near], b.double()[near])
    assert not torch.equal(round_inputs_to_int16(b)[~near], b.double()[~near])


def test_bfloat16_activations_take_int16_inputs_and_float32_ones_do_not():
    x, (q8, s8), (q4, s4) = op_case(2, 300, 9, 128, torch.float32)
    for xt, mode in ((x, "float32"), (x.bfloat16(), "int16")):
        assert torch.equal(ops.gemv_int8(xt, q8, s8), with_input(mode, lambda: ops.gemv_int8(xt, q8, s8)))
        assert torch.equal(ops.gemv_int4(xt, q4, s4, 128), with_input(mode, lambda: ops.gemv_int4(xt, q4, s4, 128)))
    # and the two paths differ on float32 inputs (x is not int16 blocks): the hook takes effect
    assert not torch.equal(with_input("int16", lambda: ops.gemv_int8(x, q8, s8)), ops.gemv_int8(x, q8, s8))
    with pytest.raises(ValueError, match="unknown input mode"):
        _C._set_quantized_input("int12")


def check_against_oracle(out, xr, w_deq):
    """out = the rounded inputs xr times the dequantized weights, in float64: the products and
    their block sums are exact, so only float32 scaling and sums across blocks differ."""
    expected = xr @ w_deq.double().t()
    bound = 2e-6 * (xr.abs() @ w_deq.double().abs().t()) + 1e-37
    err = (out.double() - expected).abs()
    assert out.dtype == torch.float32 and (err <= bound).all(), float((err - bound).max())


ROUNDINGS = {"int16": round_inputs_to_int16, "int8": round_inputs_to_int8}


@pytest.mark.parametrize("mode", list(ROUNDINGS))
# group 192: three sub-blocks of 64 a group, so groups and int8's blocks of 128 do not line up
@pytest.mark.parametrize("B,K,N,G", OP_SHAPES + [(2, 700, 11, 192)], ids=lambda v: str(v))
def test_integer_inputs_match_their_oracle_on_every_isa(mode, B, K, N, G):
    x = int16_case_x(B, K, seed=B + K)
    _, (q8, s8), (q4, s4) = op_case(B, K, N, G, torch.float32)
    xr = ROUNDINGS[mode](x)
    for isa in available_isas():
        y8 = with_isa(isa, lambda: with_input(mode, lambda: ops.gemv_int8(x, q8, s8)))
        y4 = with_isa(isa, lambda: with_input(mode, lambda: ops.gemv_int4(x, q4, s4, G)))
        check_against_oracle(y8, xr, dequantize_int8(q8, s8))
        if G % 64 == 0:
            check_against_oracle(y4, xr, dequantize_int4(q4, s4, K, G))
        else:  # groups of 32 keep float32 inputs
            assert torch.equal(y4, with_isa(isa, lambda: with_input("float32", lambda: ops.gemv_int4(x, q4, s4, G))))


def test_float32_inputs_near_the_top_of_float32_range():
    """The float32-input products sum raw weights times x before scaling: inputs near 1e37 (the
    output itself well inside float32) are scaled down by a power of two first, on every ISA."""
    B, K, N, G = 2, 300, 9, 128
    _, (q8, s8), (q4, s4) = op_case(B, K, N, G, torch.float32)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, K, generator=g) * 1e37
    x[0, :5] = torch.tensor([1e-30, 0.0, -3e38, 1.0, 2.0 ** 64])  # the largest, a zero, small ones
    for isa in available_isas():
        y8 = with_isa(isa, lambda: with_input("float32", lambda: ops.gemv_int8(x, q8, s8)))
        y4 = with_isa(isa, lambda: with_input("float32", lambda: ops.gemv_int4(x, q4, s4, G)))
        check_against_reference(y8, x, dequantize_int8(q8, s8))
        check_against_reference(y4, x, dequantize_int4(q4, s4, K, G))
    # just below the cut-over (largest |x| < 2^64) the plain loops run; both sides agree there too
    x = x / x.abs().max() * 2.0 ** 63
    check_against_reference(ops.gemv_int8(x, q8, s8), x, dequantize_int8(q8, s8))


@pytest.mark.parametrize("big", [1e6, 1e8, 1e30])
@pytest.mark.parametrize("G", [32, 64, 128])
def test_float32_int4_input_huge_where_its_weight_is_zero(big, G):
    """One input huge beside the others, whose weight is 0 in every row, adds nothing: the int4
    kernels take nibble - 8 before the product. (The rewrite sum (u - 8) x = sum u x - 8 sum x
    put it into two float32 sums whose difference lost the rest: at 1e6 an output off by ~1e-2,
    at 1e8 zero.) The bound is check_against_reference's, |x| @ |w| with the huge input's weight
    0: float32 rounding of the others only. Every ISA; 1e30 also passes the large-input scaling."""
    B, K, N = 3, 300, 9
    w = weight(N, K, seed=1)
    w[:, [5, 130]] = 0          # int4 value 0 (nibble 8) and int8 0 in every row
    x = torch.randn(B, K, generator=torch.Generator().manual_seed(2))
    x[:, 5] = big
    x[1, 130] = -big            # a second group, the other sign
    (q8, s8), (q4, s4) = quantize_int8(w), quantize_int4(w, G)
    for isa in available_isas():
        y8 = with_isa(isa, lambda: with_input("float32", lambda: ops.gemv_int8(x, q8, s8)))
        y4 = with_isa(isa, lambda: with_input("float32", lambda: ops.gemv_int4(x, q4, s4, G)))
        check_against_reference(y8, x, dequantize_int8(q8, s8))
        check_against_reference(y4, x, dequantize_int4(q4, s4, K, G))


@pytest.mark.parametrize("G", [2 ** 63 - 32, 2 ** 63 - 64, 2 ** 62, 2 ** 40 + 32, 2 ** 24])
@pytest.mark.parametrize("mode", ["float32", "int16", "int8"])
def test_int4_group_longer_than_the_row(G, mode):
    """A group at least as long as the row (any multiple of 32 up to int64's top) is one group a
    row: scales [N, 1], computed as with any such group (ceil(K / G) used to overflow to 0 groups
    near 2^63, so scales [N, 0] passed and the op gave zeros, or crashed under int8 inputs); [N, 0]
    is refused naming the count. Every ISA and input mode; held to the reference (float32 inputs)
    or to the rounded-input oracle (integer inputs, taken when G % 64 == 0)."""
    B, K, N = 3, 72, 5
    w = weight(N, K, seed=4)
    q4, s4 = quantize_int4(w, 128)  # K <= 128: the same single group as any G >= K
    assert s4.shape == (N, 1)
    x = torch.randn(B, K, generator=torch.Generator().manual_seed(5))
    w4 = dequantize_int4(q4, s4, K, 128)
    for isa in available_isas():
        y4 = with_isa(isa, lambda: with_input(mode, lambda: ops.gemv_int4(x, q4, s4, G)))
        if mode == "float32" or G % 64:
            check_against_reference(y4, x, w4)
        else:
            check_against_oracle(y4, ROUNDINGS[mode](x), w4)
    with pytest.raises(ValueError, match=r"must have 1 groups per row \(72 inputs, group_size"):
        ops.gemv_int4(x, q4, s4[:, :0].contiguous(), G)


# ------------------------------------------------------------------------------ int8 inputs (opt-in)
# emu_fast.set_quantized_activations("int8"): every block of 128 inputs rounded to int8 multiples of
# its step (emu_fast.quantize.round_inputs_to_int8); held, like int16, to the exact oracle above.


def test_int8_oracle_rounding():
    # max 1.0 = 0.5 * 2^1: step (0.5 / 127) * 2 = 1/127; 0.5 -> 63.5 steps -> 64 (half to even);
    # -0.75 -> -95.25 -> -95; 1e-3 -> 0.127 -> 0. A block of zeros stays zeros.
    x = torch.zeros(1, 256)
    x[0, :4] = torch.tensor([1.0, 0.5, -0.75, 1e-3])
    expected = torch.zeros(1, 256, dtype=torch.float64)
    step = float(torch.tensor(0.5) / 127) * 2
    expected[0, :4] = torch.tensor([127 * step, 64 * step, -95 * step, 0.0], dtype=torch.float64)
    assert torch.equal(round_inputs_to_int8(x), expected)
    # every input moves by at most half a step, max|x| / 254 (and a little float32 rounding), in
    # blocks of 128 inputs at scales 1e-30 to 1e30. Below about 2^-100 the float32 step itself
    # loses bits (it is subnormal from max|x| < 2^-119): there the kernels still give the oracle.
    x = torch.randn(3, 700) * torch.logspace(-30, 30, 6).repeat_interleave(128)[:700]
    block_max = torch.nn.functional.pad(x.abs(), (0, 68)).unflatten(-1, (-1, 128)).amax(-1)
    bound = block_max.double().repeat_interleave(128, -1)[:, :700] * (1 / 254 + 1e-6)
    xr = round_inputs_to_int8(x)
    assert ((xr - x.double()).abs() <= bound).all()
    assert (xr != x.double()).any()


@pytest.mark.parametrize("mode", ["int16", "int8"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_integer_inputs_with_non_finite_values_give_what_float32_gives(mode, bad):
    x, (q8, s8), (q4, s4) = op_case(3, 300, 9, 64, torch.float32)
    x[1, 77] = bad
    for isa in available_isas():
        for op in (lambda: ops.gemv_int8(x, q8, s8), lambda: ops.gemv_int4(x, q4, s4, 64)):
            forced = with_isa(isa, lambda: with_input(mode, op))
            plain = with_isa(isa, lambda: with_input("float32", op))
            assert torch.equal(forced.isnan(), plain.isnan())
            assert torch.equal(torch.nan_to_num(forced), torch.nan_to_num(plain))
            assert not forced[1].isfinite().any() and forced[[0, 2]].isfinite().all()


def test_set_quantized_activations():
    x, (q8, s8), (q4, s4) = op_case(2, 300, 9, 128, torch.float32)
    xb = x.bfloat16()
    w8, w4 = dequantize_int8(q8, s8), dequantize_int4(q4, s4, 300, 128)
    assert emu_fast.quantized_activations() == "auto"
    auto = ops.gemv_int4(xb, q4, s4, 128)
    outputs = {}
    try:
        for mode in ["float32", "int16", "int8"]:
            emu_fast.set_quantized_activations(mode)
            assert emu_fast.quantized_activations() == mode
            # each mode computes its own oracle, on float32 activations (which "auto" leaves as they are)
            y8, y4 = ops.gemv_int8(x, q8, s8), ops.gemv_int4(x, q4, s4, 128)
            if mode == "float32":
                check_against_reference(y8, x, w8)
                check_against_reference(y4, x, w4)
            else:
                check_against_oracle(y8, ROUNDINGS[mode](x), w8)
                check_against_oracle(y4, ROUNDINGS[mode](x), w4)
            outputs[mode] = (y4, ops.gemv_int4(xb, q4, s4, 128))
        assert not torch.equal(outputs["float32"][0], outputs["int16"][0])
        assert not torch.equal(outputs["int16"][0], outputs["int8"][0])
        # bfloat16 activations: "int16" is what "auto" does with them; "int8" changes the result
        assert torch.equal(outputs["int16"][1], auto) and not torch.equal(outputs["int8"][1], auto)
        with pytest.raises(ValueError, match="unknown mode 'int4'"):
            emu_fast.set_quantized_activations("int4")
        assert emu_fast.quantized_activations() == "int8"   # a refused mode changed nothing
    finally:
        emu_fast.set_quantized_activations("auto")
    assert emu_fast.quantized_activations() == "auto"
    assert torch.equal(ops.gemv_int4(xb, q4, s4, 128), auto)
    assert torch.equal(ops.gemv_int4(x, q4, s4, 128), outputs["float32"][0])


@pytest.mark.parametrize("mode", list(ROUNDINGS))
def test_integer_inputs_at_extreme_scales_match_their_oracle(mode):
    """Whole blocks whose largest |x| is 0, subnormal (1e-39), tiny (1e-37: int8's step is then
    subnormal) or at least 2^126 (1e38: int8's scalar rounding; the products scale each block's
    sum by step times weight scale, which stays in range), one scale a row so each output is held
    at its own magnitude."""
    K = 128 * 3 + 40
    scales = torch.tensor([1.0, 0.0, 1e-39, 1e-37, 1e38, 3e-3])
    x = torch.randn(len(scales), K, generator=torch.Generator().manual_seed(7)).clamp(-3, 3) * scales[:, None]
    w = weight(9, K, seed=3, scale=1e-3)
    (q8, s8), (q4, s4) = quantize_int8(w), quantize_int4(w, 128)
    xr = ROUNDINGS[mode](x)
    assert torch.equal(xr[1], torch.zeros(K, dtype=torch.float64)) and x[4].abs().max() >= 2.0 ** 126
    for isa in available_isas():
        y8 = with_isa(isa, lambda: with_input(mode, lambda: ops.gemv_int8(x, q8, s8)))
        y4 = with_isa(isa, lambda: with_input(mode, lambda: ops.gemv_int4(x, q4, s4, 128)))
        check_against_oracle(y8, xr, dequantize_int8(q8, s8))
        check_against_oracle(y4, xr, dequantize_int4(q4, s4, K, 128))
        assert y8.isfinite().all() and y4.isfinite().all() and (y4[1] == 0).all()


def test_isa_hook():
    have = available_isas()
    assert have[-1] == "portable" and len(have) >= 1
    for isa in ISAS:
        if isa not in have:  # a processor without it: the hook refuses, and nothing changes
            assert _C._set_quantized_gemv_isa(isa) is False
    with pytest.raises(ValueError, match="unknown instruction set"):
        _C._set_quantized_gemv_isa("sse9")


def test_ops_take_strided_x_and_empty_sizes():
    x, (q8, s8), (q4, s4) = op_case(3, 64, 5, 32, torch.float32)
    wide = torch.randn(3, 128)
    wide[:, ::2] = x
    strided = wide[:, ::2]
    assert not strided.is_contiguous()
    torch.testing.assert_close(ops.gemv_int8(strided, q8, s8), ops.gemv_int8(x, q8, s8), rtol=0, atol=0)
    torch.testing.assert_close(ops.gemv_int4(strided, q4, s4, 32), ops.gemv_int4(x, q4, s4, 32), rtol=0, atol=0)
    assert ops.gemv_int8(x[:0], q8, s8).shape == (0, 5)
    assert ops.gemv_int4(x[:0], q4, s4, 32).shape == (0, 5)
    assert ops.gemv_int8(x, q8[:0], s8[:0]).shape == (3, 0)
    q0, s0 = quantize_int8(torch.zeros(4, 0))
    assert torch.equal(ops.gemv_int8(torch.zeros(2, 0), q0, s0), torch.zeros(2, 4))
    q0, s0 = quantize_int4(torch.zeros(4, 0), 32)
    assert torch.equal(ops.gemv_int4(torch.zeros(2, 0), q0, s0, 32), torch.zeros(2, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(dtype):
    x, (q8, s8), (q4, s4) = op_case(2, 72, 5, 32, dtype)
    torch.library.opcheck(torch.ops.emu_fast.gemv_int8.default, (x, q8, s8))
    torch.library.opcheck(torch.ops.emu_fast.gemv_int4.default, (x, q4, s4, 32))


def test_fake_kernels_check_and_shape():
    x, (q8, s8), (q4, s4) = op_case(2, 72, 5, 32, torch.float32)
    meta = lambda *ts: [t.to("meta") for t in ts]  # noqa: E731
    assert ops.gemv_int8(*meta(x, q8, s8)).shape == (2, 5)
    assert ops.gemv_int4(*meta(x, q4, s4), 32).shape == (2, 5)
    with pytest.raises(ValueError, match="inner sizes differ"):
        ops.gemv_int8(*meta(x[:, :70], q8, s8))
    with pytest.raises(ValueError, match="different devices"):
        ops.gemv_int4(x, *meta(q4, s4), 32)


def test_ops_reject_bad_input():
    x, (q8, s8), (q4, s4) = op_case(2, 72, 5, 32, torch.float32)
    with pytest.raises(ValueError, match=r"gemv_int8: x .* does not match qweight .*\(inner sizes differ\)"):
        ops.gemv_int8(x[:, :70], q8, s8)
    with pytest.raises(TypeError, match="gemv_int8: qweight must be torch.int8, got torch.uint8"):
        ops.gemv_int8(x, q8.view(torch.uint8), s8)
    with pytest.raises(TypeError, match="scales must be torch.float32, got torch.bfloat16"):
        ops.gemv_int8(x, q8, s8.bfloat16())
    with pytest.raises(TypeError, match="x must be float32 or bfloat16 .* got torch.float16"):
        ops.gemv_int8(x.half(), q8, s8)
    with pytest.raises(TypeError, match="got torch.float64"):
        ops.gemv_int4(x.double(), q4, s4, 32)
    with pytest.raises(ValueError, match="scales .* one row per output row"):
        ops.gemv_int8(x, q8, s8[:4])
    with pytest.raises(ValueError, match="scales must be 1-D"):
        ops.gemv_int8(x, q8, s8[:, None])
    with pytest.raises(ValueError, match="x must be 2-D"):
        ops.gemv_int8(x[0], q8, s8)
    with pytest.raises(ValueError, match="qweight must be contiguous"):
        ops.gemv_int8(x[:, :36], torch.cat([q8[:, :36], q8[:, :36]], 0)[::2], s8)
    for bad in (48, 0, -32):
        with pytest.raises(ValueError, match="group_size must be a positive multiple of 32"):
            ops.gemv_int4(x, q4, s4, bad)
    with pytest.raises(ValueError, match="does not hold x's 72 inputs per row"):
        ops.gemv_int4(x, q4[:, :16].contiguous(), s4, 32)
    with pytest.raises(ValueError, match="must have 3 groups per row"):
        ops.gemv_int4(x, q4, s4[:, :2].contiguous(), 32)
    with pytest.raises(ValueError, match="must have 2 groups per row"):
        ops.gemv_int4(x, q4, s4, 64)
    with pytest.raises(TypeError, match="qweight must be torch.uint8"):
        ops.gemv_int4(x, q4.view(torch.int8), s4, 32)
    # and still fine afterwards
    check_against_reference(ops.gemv_int4(x, q4, s4, 32), x, dequantize_int4(q4, s4, 72, 32))


# ------------------------------------------------------------------------------ the modules


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_quantized_linear_forward(scheme, dtype):
    torch.manual_seed(0)
    lin = nn.Linear(100, 37, bias=True).to(dtype)
    module = Int8Linear.from_linear(lin) if scheme == "int8" else Int4Linear.from_linear(lin, group_size=64)
    assert module.qweight.device.type == "cpu" and module.bias.dtype == dtype
    torch.testing.assert_close(module.bias, lin.bias, rtol=0, atol=0)
    w = module.dequantize(torch.float32)
    assert module.dequantize().dtype == dtype and w.shape == (37, 100)
    x = torch.randn(2, 3, 100).to(dtype)
    with torch.no_grad():
        y = module(x)                                           # 6 rows: the op
        expected = F.linear(x.float(), w, lin.bias.float())
        long_x = torch.randn(ql.GEMV_MAX_ROWS + 5, 100).to(dtype)
        y_long = module(long_x)                                 # past GEMV_MAX_ROWS: dequantize + F.linear
        y_half = module(x.half())                               # a dtype the op does not take
    assert y.shape == (2, 3, 37) and y.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y.float(), expected, **tol)
    torch.testing.assert_close(y_long.float(), F.linear(long_x.float(), w, lin.bias.float()), **tol)
    assert y_half.dtype == torch.float16
    torch.testing.assert_close(y_half.float(), expected, rtol=2e-2, atol=2e-2)
    assert "in_features=100, out_features=37" in repr(module)


def test_quantized_linear_under_torch_compile():
    """The fake kernels let a module using the ops trace whole (fullgraph) and run the ops."""
    torch.manual_seed(0)
    lin = nn.Linear(128, 40, bias=True)
    x = torch.randn(3, 128)
    for module in (Int8Linear.from_linear(lin), Int4Linear.from_linear(lin, group_size=64)):
        with torch.no_grad():
            compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
            torch.testing.assert_close(compiled(x), module(x), rtol=0, atol=0)


def test_quantized_linear_casts_backward_and_state():
    torch.manual_seed(0)
    lin = nn.Linear(64, 9, bias=True)
    module = Int4Linear.from_linear(lin, group_size=32)
    scales, w = module.scales.clone(), module.dequantize()
    module.to(torch.bfloat16)                    # as model.to(torch.bfloat16) does to every module
    assert module.scales.dtype == torch.float32 and torch.equal(module.scales, scales)
    assert module.dtype == module.bias.dtype == module.dequantize().dtype == torch.bfloat16
    torch.testing.assert_close(module.dequantize(torch.float32), w, rtol=0, atol=0)
    module.float()
    assert module.dtype == torch.float32 and torch.equal(module.scales, scales)
    # an input that needs a gradient gets one (the differentiable path), equal to F.linear's
    x = torch.randn(3, 64, requires_grad=True)
    module(x).square().sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    F.linear(x_ref, w, module.bias.float()).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    # state_dict round trip into a fresh module
    fresh = Int4Linear(64, 9, bias=True, group_size=32)
    fresh.load_state_dict(module.state_dict())
    assert torch.equal(fresh.qweight, module.qweight) and torch.equal(fresh.scales, module.scales)
    with pytest.raises(ValueError, match="multiple of 32"):
        Int4Linear(64, 9, group_size=40)


# ------------------------------------------------------------------------------ quantizing a model


def _layer_modules(model):
    body = model.decoder.lm.model
    return [(i, path, layer.get_submodule(path)) for i, layer in enumerate(body.layers) for path in LAYER_LINEARS]


def _untouched(model):
    """The modules that must keep the model's dtype: embeddings, norms, lm_head, heads."""
    lm = model.decoder.lm
    names = ["model.embed_tokens", "model.norm", "lm_head", "stu_regress_head", "project_up", "project_down"]
    return {n: lm.get_submodule(n) for n in names if hasattr(lm, n.split(".")[0]) and _has(lm, n)}


def _has(module, name):
    try:
        module.get_submodule(name)
        return True
    except AttributeError:
        return False


def _with_dequantized_weights(quantized_model, original_copy):
    """original_copy with each decoder linear's weight set to the quantized model's dequantize()."""
    for (i, path, q), (_, _, lin) in zip(_layer_modules(quantized_model), _layer_modules(original_copy)):
        with torch.no_grad():
            lin.weight.copy_(q.dequantize(torch.float32).to(lin.weight.dtype))
    return original_copy


def _hf_outputs(model, ids, mask):
    with torch.no_grad():
        out = model.decoder.lm(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    return out.logits, out.hidden_states[-1]


@pytest.mark.parametrize("kind", ["emu1", "emu2"])
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_model_forward_matches_dequantized_weights(kind, scheme, emu_tokenizer):
    model = tiny_emu(kind, tokenizer=emu_tokenizer, kv_heads=2, intermediate=160, hidden=96, heads=4)
    reference_model = copy.deepcopy(model)
    kept = {n: copy.deepcopy(m.state_dict()) for n, m in _untouched(model).items()}
    quantize_decoder_linears_(model, weights=scheme, group_size=32)
    cls = Int8Linear if scheme == "int8" else Int4Linear
    assert all(isinstance(m, cls) for _, _, m in _layer_modules(model))
    assert len(_layer_modules(model)) == 7 * len(model.decoder.lm.model.layers)
    for name, module in _untouched(model).items():  # not quantized, same weights
        assert not ql.is_quantized(module)
        for k, v in module.state_dict().items():
            assert torch.equal(v, kept[name][k]), name
    _with_dequantized_weights(model, reference_model)

    batch = emu_tokenizer(["a photo of a cat", "a red fox sitting in tall grass at dawn"], padding="longest",
                          return_tensors="pt")
    logits, hidden = _hf_outputs(model, batch.input_ids, batch.attention_mask)
    ref_logits, ref_hidden = _hf_outputs(reference_model, batch.input_ids, batch.attention_mask)
    assert rel_err(hidden, ref_hidden) <= 1e-4 and rel_err(logits, ref_logits) <= 1e-4
    # the model's own generate_image (upstream's recompute loop through the HF forward)
    prompts = ["a photo of a cat", "two dogs"]
    assert rel_err(model.generate_image(prompts), reference_model.generate_image(prompts)) <= 1e-4


def test_quantized_bf16_model_runs(emu_tokenizer):
    model = tiny_emu("emu2", tokenizer=emu_tokenizer, dtype=torch.bfloat16)
    reference_model = copy.deepcopy(model)
    quantize_decoder_linears_(model, weights="int8")
    _with_dequantized_weights(model, reference_model)
    out, ref = model.generate_image(["a cat"]), reference_model.generate_image(["a cat"])
    assert out.dtype == torch.bfloat16 and rel_err(out, ref) <= 5e-2


def test_quantizing_releases_each_layers_weights_as_it_goes(monkeypatch, emu_tokenizer):
    """While layer i is quantized, the original weights of layers before it are gone: memory
    holds the quantized layers and the originals not yet reached, never both for one layer."""
    model = tiny_emu("emu1", tokenizer=emu_tokenizer, layers=3)
    refs = [(i, weakref.ref(m.weight)) for i, _, m in _layer_modules(model)]
    seen = []
    real = ql.quantize_int8

    def spy(w, **kw):
        gc.collect()
        alive = [i for i, r in refs if r() is not None]
        seen.append((len(seen), alive))
        return real(w, **kw)

    monkeypatch.setattr(ql, "quantize_int8", spy)
    quantize_decoder_linears_(model, weights="int8")
    assert len(seen) == len(refs)
    per_layer = len(LAYER_LINEARS)
    for j, alive in seen:
        # the j-th projection being quantized: all earlier ones released, all later ones alive
        assert len(alive) == len(refs) - j, (j, alive)
        assert min(alive) == j // per_layer
    gc.collect()
    assert all(r() is None for _, r in refs)


@pytest.mark.parametrize("scheme,group", [("int8", None), ("int4", 32)])
def test_quantizing_onto_a_device_gives_the_same_buffers(scheme, group, monkeypatch, emu_tokenizer):
    """device= moves each projection's rows over in chunks; on the same device the buffers are
    bit for bit those of quantizing in place (the GPU case: test_cuda.py)."""
    model = tiny_emu("emu2", tokenizer=emu_tokenizer, layers=2, hidden=96, intermediate=300)
    twin = copy.deepcopy(model)
    kw = {"group_size": group} if group else {}
    quantize_decoder_linears_(twin, weights=scheme, **kw)
    monkeypatch.setattr(emu_fast.quantize, "_ROWS_PER_CHUNK", 7)  # several chunks a projection, the last short
    quantize_decoder_linears_(model, weights=scheme, device="cpu", **kw)
    for (_, _, a), (_, _, b) in zip(_layer_modules(model), _layer_modules(twin)):
        assert torch.equal(a.qweight, b.qweight) and torch.equal(a.scales, b.scales)


def test_quantizing_onto_a_device_moves_one_layer_at_a_time(monkeypatch, emu_tokenizer):
    """While layer i is quantized onto the target device, layers before it are there whole
    (projections and norms), later ones are where they were; the rest of the model is not moved
    (accelerate moves it). The meta device stands in for a GPU: the same code path, no values."""
    model = tiny_emu("emu1", tokenizer=emu_tokenizer, layers=3)
    layers = model.decoder.lm.model.layers
    seen = []
    real = ql.quantize_int8

    def spy(w, device=None):
        assert device == torch.device("meta") and w.device.type == "cpu"   # from the CPU, onto the target
        seen.append([{p.device.type for p in layer.parameters()} | {b.device.type for b in layer.buffers()}
                     for layer in layers])
        return real(w, device=device)

    monkeypatch.setattr(ql, "quantize_int8", spy)
    quantize_decoder_linears_(model, weights="int8", device="meta")
    per_layer = len(LAYER_LINEARS)
    assert len(seen) == per_layer * len(layers)
    for j, devices in enumerate(seen):
        i = j // per_layer   # the layer being quantized
        assert all(d == {"meta"} for d in devices[:i]), (j, devices)
        assert all(d == {"cpu"} for d in devices[i + 1:]), (j, devices)
    assert all({b.device.type for b in layer.buffers()} | {p.device.type for p in layer.parameters()} == {"meta"}
               for layer in layers)
    assert model.decoder.lm.model.embed_tokens.weight.device.type == "cpu"


def test_accelerate_refuses_a_device_that_is_not_there(emu_tokenizer):
    model = tiny_emu("emu1", tokenizer=emu_tokenizer)
    for device, message in [("gpu0", "is not a torch device"), (3.5, "is not a torch device")] + \
            ([] if torch.cuda.is_available() else [("cuda", "CUDA is not available")]):
        with pytest.raises(ValueError, match=message):
            emu_fast.accelerate(model, weights="int8", device=device)
        with pytest.raises(ValueError, match=message):
            quantize_decoder_linears_(model, weights="int8", device=device)
    assert all(type(m) is nn.Linear for _, _, m in _layer_modules(model))    # nothing changed
    assert not hasattr(model, "emu_fast_decoder")
    # device="cpu" (where it is) quantizes and runs as without it
    twin = copy.deepcopy(model)
    out = emu_fast.accelerate(model, weights="int8", device="cpu").generate_image(["a cat"])
    torch.testing.assert_close(out, emu_fast.accelerate(twin, weights="int8").generate_image(["a cat"]),
                               rtol=0, atol=0)


def test_quantize_rejects_unknown_scheme_and_requantizing(emu_tokenizer):
    model = tiny_emu("emu2", tokenizer=emu_tokenizer)
    with pytest.raises(ValueError, match="unknown weight scheme 'int3'"):
        quantize_decoder_linears_(model, weights="int3")
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_decoder_linears_(model, weights="int4", group_size=100)
    assert all(type(m) is nn.Linear for _, _, m in _layer_modules(model))    # nothing changed
    quantize_decoder_linears_(model, weights="int4", group_size=32)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_decoder_linears_(model, weights="int8")
    with pytest.raises(TypeError, match="neither"):
        quantize_decoder_linears_(nn.Linear(2, 2))
    # accelerate runs a quantized model in its own scheme, and refuses to quantize it again another way
    with pytest.raises(ValueError, match=r"already quantized as int4 \(group_size 32\); asked for int8"):
        emu_fast.accelerate(model, weights="int8")
    assert emu_fast.accelerate(model).emu_fast_decoder.weights == "int4"


def test_quantizing_an_accelerated_model_asks_for_accelerate_again(emu_tokenizer):
    model = emu_fast.accelerate(tiny_emu("emu1", tokenizer=emu_tokenizer))
    quantize_decoder_linears_(model, weights="int8")
    with pytest.raises(RuntimeError, match="call emu_fast.accelerate"):
        model.generate_image(["a cat"])
    assert model._emu_fast_original_generate_image(["a cat"]).shape == (1, 8, 64)   # upstream's loop still runs


# ------------------------------------------------------------------------------ save / load


@pytest.mark.parametrize("kind,scheme", [("emu1", "int8"), ("emu2", "int4")])
def test_save_load_same_output(kind, scheme, tmp_path, emu_tokenizer):
    model = quantize_decoder_linears_(tiny_emu(kind, tokenizer=emu_tokenizer), weights=scheme, group_size=32)
    path = tmp_path / "q.safetensors"
    save_quantized(model, path)
    fresh = tiny_emu(kind, tokenizer=emu_tokenizer, seed=7)     # other random weights, same config
    assert load_quantized(fresh, path) is fresh
    assert all(ql.is_quantized(m) for _, _, m in _layer_modules(fresh))
    batch = emu_tokenizer(["a photo of a cat", "a fox"], padding="longest", return_tensors="pt")
    for a, b in zip(_hf_outputs(model, batch.input_ids, batch.attention_mask),
                    _hf_outputs(fresh, batch.input_ids, batch.attention_mask)):
        assert torch.equal(a, b)
    assert torch.equal(model.generate_image(["a cat"]), fresh.generate_image(["a cat"]))
    # into a model already quantized the same way; and from a QuantizedState
    save_quantized(quantized_state_dict(model), tmp_path / "again.safetensors")
    assert load_quantized(fresh, tmp_path / "again.safetensors") is fresh
    assert torch.equal(model.generate_image(["a dog"]), fresh.generate_image(["a dog"]))


def test_load_into_meta_model(tmp_path, emu_tokenizer):
    model = quantize_decoder_linears_(tiny_emu("emu2", tokenizer=emu_tokenizer), weights="int8")
    save_quantized(model, tmp_path / "q.safetensors")
    # buffers too (RoPE's inv_freq, and transformers 4.31's cos/sin caches, are in no file): refused,
    # naming them
    with torch.device("meta"):
        with pytest.raises(ValueError, match=r"buffers \[.*(inv_freq|cos_cached).*\] are on the meta device"):
            load_quantized(tiny_emu("emu2", tokenizer=emu_tokenizer), tmp_path / "q.safetensors")
    from accelerate import init_empty_weights

    with init_empty_weights():  # parameters on the meta device, buffers real
        skeleton = tiny_emu("emu2", tokenizer=emu_tokenizer)
    assert skeleton.decoder.lm.lm_head.weight.is_meta
    load_quantized(skeleton, tmp_path / "q.safetensors")
    assert all(not t.is_meta for t in skeleton.decoder.lm.state_dict().values())
    assert torch.equal(model.decoder.lm.lm_head.weight, skeleton.decoder.lm.lm_head.weight)
    ids = torch.tensor([[1, 450, 6635, 29889]])
    assert torch.equal(_hf_outputs(model, ids, None)[1], _hf_outputs(skeleton, ids, None)[1])


def _unchanged(model, before):
    assert all(type(m) is nn.Linear for _, _, m in _layer_modules(model))
    after = model.decoder.lm.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_load_rejects_bad_files(tmp_path, emu_tokenizer):
    from safetensors.torch import save_file

    q8 = quantize_decoder_linears_(tiny_emu("emu2", tokenizer=emu_tokenizer), weights="int8")
    good = tmp_path / "int8.safetensors"
    save_quantized(q8, good)
    target = tiny_emu("emu2", tokenizer=emu_tokenizer, seed=3)
    before = copy.deepcopy(target.decoder.lm.state_dict())

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_quantized(target, corrupt)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-1000])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_quantized(target, truncated)
    plain = tmp_path / "plain.safetensors"
    save_file({"a": torch.zeros(2)}, plain)
    with pytest.raises(ValueError, match="not an emu_fast quantized checkpoint"):
        load_quantized(target, plain)
    with pytest.raises(FileNotFoundError):
        load_quantized(target, tmp_path / "missing.safetensors")

    state = quantized_state_dict(q8)
    renamed = dict(state.metadata, version="99")
    save_file(state.tensors, tmp_path / "v99.safetensors", metadata=renamed)
    with pytest.raises(ValueError, match="format version '99'"):
        load_quantized(target, tmp_path / "v99.safetensors")
    bad_shape = dict(state.tensors)
    key = "model.layers.1.mlp.down_proj.qweight"
    bad_shape[key] = bad_shape[key][:, :-1].contiguous()
    save_file(bad_shape, tmp_path / "shape.safetensors", metadata=state.metadata)
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.down_proj.qweight is I8 \[64, 95\] in the file"):
        load_quantized(target, tmp_path / "shape.safetensors")
    missing = {k: v for k, v in state.tensors.items() if k != key}
    save_file(missing, tmp_path / "missing_key.safetensors", metadata=state.metadata)
    with pytest.raises(ValueError, match="missing \\['model.layers.1.mlp.down_proj.qweight'\\]"):
        load_quantized(target, tmp_path / "missing_key.safetensors")

    with pytest.raises(ValueError, match="config does not match .*hidden_size: file 64, model 96"):
        load_quantized(tiny_emu("emu2", tokenizer=emu_tokenizer, hidden=96), good)
    with pytest.raises(ValueError, match="holds an emu2 model; this is an emu1 model"):
        load_quantized(tiny_emu("emu1", tokenizer=emu_tokenizer), good)
    _unchanged(target, before)                      # every refusal above left the model as it was

    q4 = quantize_decoder_linears_(tiny_emu("emu2", tokenizer=emu_tokenizer), weights="int4", group_size=32)
    with pytest.raises(ValueError, match="holds int8 weights but the model is already quantized as int4"):
        load_quantized(q4, good)
    with pytest.raises(ValueError, match="not quantized"):
        save_quantized(target, tmp_path / "unquantized.safetensors")


def test_load_rejects_damaged_metadata_and_bad_scales(tmp_path, emu_tokenizer):
    """A config that is valid JSON but not an object, a bad int4 group_size, and scales that are
    NaN, inf, negative or subnormal are refused with ValueError naming what (they raised
    AttributeError, or loaded and gave garbage), the model unchanged. Scales of 0 load: the
    quantizer writes them for an all-zero row or group."""
    from safetensors.torch import save_file

    q4 = quantize_decoder_linears_(tiny_emu("emu2", tokenizer=emu_tokenizer), weights="int4", group_size=32)
    state = quantized_state_dict(q4)
    target = tiny_emu("emu2", tokenizer=emu_tokenizer, seed=3)
    before = copy.deepcopy(target.decoder.lm.state_dict())
    for config in ("[]", "null", "1", '"hidden_size"'):
        save_file(state.tensors, tmp_path / "c.safetensors", metadata=dict(state.metadata, config=config))
        with pytest.raises(ValueError, match=r"damaged metadata \(config is \w+ .* not a JSON object\)"):
            load_quantized(target, tmp_path / "c.safetensors")
    for group in ("0", "-32", "48"):
        save_file(state.tensors, tmp_path / "g.safetensors", metadata=dict(state.metadata, group_size=group))
        with pytest.raises(ValueError, match=r"damaged metadata \(.*group_size must be a positive multiple of 32"):
            load_quantized(target, tmp_path / "g.safetensors")
    key = "model.layers.1.self_attn.o_proj.scales"
    for bad in (float("nan"), float("inf"), -float("inf"), -0.5, 1e-40, 2.0 ** -127):
        tensors = dict(state.tensors)
        tensors[key] = tensors[key].clone()
        tensors[key][3, 1] = bad
        save_file(tensors, tmp_path / "s.safetensors", metadata=state.metadata)
        with pytest.raises(ValueError, match=rf"{key} holds 1 scales that are NaN, inf, negative or subnormal "
                                             rf"\(first .* at \[3, 1\]\)"):
            load_quantized(target, tmp_path / "s.safetensors")
    _unchanged(target, before)
    # a zero row's scales, and the smallest normal scale, load and compute as the quantized model
    tensors = dict(state.tensors)
    tensors[key] = tensors[key].clone()
    tensors[key][3] = 0
    tensors[key][4, 0] = torch.finfo(torch.float32).tiny
    save_file(tensors, tmp_path / "ok.safetensors", metadata=state.metadata)
    load_quantized(target, tmp_path / "ok.safetensors")
    assert torch.equal(target.decoder.lm.model.layers[1].self_attn.o_proj.scales, tensors[key])


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
