"""How the CPU quantized GEMVs take their activations: bfloat16 ones as int16 blocks, the opt-in
int8 blocks (emu_fast.set_quantized_activations), float32 ones as they are; each path held to
its exact oracle (emu_fast.quant.schemes.round_inputs_to_int16 / round_inputs_to_int8) on every
instruction set, at extreme scales, with non-finite inputs and int4 groups longer than a row."""
import pytest
import torch

import emu_fast
from emu_fast import _C, ops
from emu_fast.quant.schemes import (dequantize_int4, dequantize_int8, quantize_int4, quantize_int8,
                                    round_inputs_to_int8, round_inputs_to_int16)
from quant_samples import (OP_SHAPES, ROUNDINGS, available_isas, check_against_oracle,
                           check_against_reference, int16_case_x, op_case, weight, with_input, with_isa)


# ------------------------------------------------------------------------------ int16 inputs
# bfloat16 activations reach the CPU kernels as int16 blocks (emu_fast.quant.schemes.round_inputs_to_int16);
# the test hook _set_quantized_input forces that path on float32 inputs, whose float32 outputs
# can then be held to the exact oracle: the rounded inputs times the dequantized weights.


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
# its step (emu_fast.quant.schemes.round_inputs_to_int8); held, like int16, to the exact oracle above.


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
