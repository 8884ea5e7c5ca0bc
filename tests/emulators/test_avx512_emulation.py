"""The AVX-512 integer-input GEMVs (csrc/kernels/quantized_gemv_avx512.inc, both the AVX-512BW and
the VNNI copy: int8 / int4 weights with int16 inputs, int4 with int8 inputs), from the production
rounding and input layouts through the kernels, against the exact oracles. They run through the
portable intrinsics of tests/avx512_emulation on every processor (CI has no AVX-512); a processor
that has it also runs the compiled kernels in tests/quant/test_quantized_inputs.py's every-ISA tests."""
import pytest
import torch

import avx512_emulator as emu
from emu_fast.quant.schemes import dequantize_int4, dequantize_int8, round_inputs_to_int8, round_inputs_to_int16
from quant_samples import OP_SHAPES, check_against_oracle, int16_case_x, op_case

pytestmark = pytest.mark.skipif(emu.shutil.which("g++") is None and not emu.os.environ.get("CXX"),
                                reason="needs a C++ compiler")

SHAPES = OP_SHAPES + [(2, 700, 11, 192), (3, 96, 5, 64), (2, 160, 9, 128)]  # K % 64 == 32: a half last block


@pytest.mark.parametrize("vnni", [False, True], ids=["avx512bw", "avx512vnni"])
@pytest.mark.parametrize("B,K,N,G", SHAPES, ids=lambda v: str(v))
def test_avx512_int16_inputs_match_the_oracle(vnni, B, K, N, G):
    x = int16_case_x(B, K, seed=B + K)
    _, (q8, s8), (q4, s4) = op_case(B, K, N, G, torch.float32)
    xr = round_inputs_to_int16(x)
    check_against_oracle(emu.gemv_int8(x, q8, s8, vnni), xr, dequantize_int8(q8, s8))
    if G % 64 == 0:  # other groups keep float32 inputs (int4_group_takes_integer_inputs)
        check_against_oracle(emu.gemv_int4(x, q4, s4, G, vnni), xr, dequantize_int4(q4, s4, K, G))


@pytest.mark.parametrize("B,K,N,G", [(3, 700, 11, 128), (2, 160, 6, 64)], ids=lambda v: str(v))
def test_avx512_copies_agree_and_write_only_their_rows(B, K, N, G):
    """VNNI's vpdpwssd and AVX-512BW's vpmaddwd + add give the same integers, so the same bits;
    a row range [n0, n1) (rows four at a time, then one by one) writes those rows only."""
    x = int16_case_x(B, K, seed=5)
    _, (q8, s8), (q4, s4) = op_case(B, K, N, G, torch.float32)
    for n0, n1 in ((0, N), (1, N - 1), (2, 3)):
        a8, b8 = (emu.gemv_int8(x, q8, s8, vnni, n0, n1) for vnni in (False, True))
        a4, b4 = (emu.gemv_int4(x, q4, s4, G, vnni, n0, n1) for vnni in (False, True))
        for a, b in ((a8, b8), (a4, b4)):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
            assert not a[:, n0:n1].isnan().any() and a[:, :n0].isnan().all() and a[:, n1:].isnan().all()


def test_emulated_word_products_follow_intel():
    """Hand cases for the word products: int8 weights -128 against inputs rounded to -32768 steps
    (each pair 2^24 * 2, no wrap: 2^28 over 64 inputs, exactly); int4 nibble 0 stands for -8 and
    0xff bytes for 7 in both nibbles."""
    x = torch.full((1, 64), -1.0)  # max 1 = 2^0: step 2^-15, -32768 steps
    y = emu.gemv_int8(x, torch.full((1, 64), -128, dtype=torch.int8), torch.ones(1), vnni=False)
    assert y.item() == 2.0 ** 28 * 2.0 ** -15
    x = torch.arange(64.0).unsqueeze(0) / 64  # max 63/64 < 2^0: step 2^-15, exact
    for vnni in (False, True):
        low = emu.gemv_int4(x, torch.zeros(1, 32, dtype=torch.uint8), torch.ones(1, 1), 64, vnni)
        high = emu.gemv_int4(x, torch.full((1, 32), 0xff, dtype=torch.uint8), torch.ones(1, 1), 64, vnni)
        assert low.item() == -8 * x.sum().item() and high.item() == 7 * x.sum().item()


# int8 inputs take the AVX-512 kernel for groups of whole blocks of 128 (others: the AVX2 one)
INT8_INPUT_SHAPES = [(B, K, N, G) for B, K, N, G in SHAPES if G % 128 == 0] + [(3, 300, 5, 384), (2, 96, 6, 128)]


@pytest.mark.parametrize("vnni", [False, True], ids=["avx512bw", "avx512vnni"])
@pytest.mark.parametrize("B,K,N,G", INT8_INPUT_SHAPES, ids=lambda v: str(v))
def test_avx512_int4_with_int8_inputs_matches_the_oracle(vnni, B, K, N, G):
    x = int16_case_x(B, K, seed=B + K)
    _, _, (q4, s4) = op_case(B, K, N, G, torch.float32)
    y = emu.gemv_int4_int8_inputs(x, q4, s4, G, vnni)
    check_against_oracle(y, round_inputs_to_int8(x), dequantize_int4(q4, s4, K, G))
    if vnni:  # vpdpbusd and AVX-512BW's vpmaddubsw + vpmaddwd give the same integers
        torch.testing.assert_close(y, emu.gemv_int4_int8_inputs(x, q4, s4, G, False), rtol=0, atol=0)
    y = emu.gemv_int4_int8_inputs(x, q4, s4, G, vnni, 1, N)  # rows 1.. only
    assert y[:, 0].isnan().all() and not y[:, 1:].isnan().any()


def test_avx512_int8_inputs_refuse_other_groups():
    x = torch.randn(1, 192)
    _, _, (q4, s4) = op_case(1, 192, 4, 64, torch.float32)
    with pytest.raises(ValueError, match="a group the kernel does not take"):
        emu.gemv_int4_int8_inputs(x, q4, s4, 64, vnni=True)


def test_emulated_byte_products_follow_intel():
    """vpdpbusd takes a as unsigned bytes and b as signed ones: nibbles 15 (bytes 0xff) times -127
    steps over 128 inputs, less the offsets 8 * sum(x), is 7 * -127 * 128 steps."""
    x = torch.full((1, 128), -1.0)  # max 1 = 0.5 * 2^1: -127 steps of 1/127
    step = float(torch.tensor(0.5) / 127) * 2
    for vnni in (False, True):
        y = emu.gemv_int4_int8_inputs(x, torch.full((1, 64), 0xff, dtype=torch.uint8), torch.ones(1, 1), 128, vnni)
        assert y.item() == pytest.approx(7 * -127 * 128 * step, rel=1e-6)
