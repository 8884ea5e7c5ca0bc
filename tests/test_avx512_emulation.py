"""The AVX-512 integer-input kernels (csrc/kernels/quantized_gemv_avx512.inc, both the AVX-512BW
and the VNNI copy: int8 / int4 weights with int16 inputs, int4 with int8 inputs) against the
exact oracles, run through the portable intrinsics of
tests/avx512_emulation on every processor (CI has no AVX-512; a processor that has it also runs
the compiled kernels in test_quantize.py's every-ISA tests)."""
import pytest
import torch

import avx512_emulator as emu
from emu_fast.quantize import dequantize_int4, dequantize_int8, round_inputs_to_int8, round_inputs_to_int16
from test_quantize import OP_SHAPES, check_against_oracle, int16_case_x, op_case

pytestmark = pytest.mark.skipif(emu.shutil.which("g++") is None and not emu.os.environ.get("CXX"),
                                reason="needs a C++ compiler")


def int16_inputs(x, k_pad):
    """x as the kernels receive it (round_inputs_to_int16, padded to k_pad with zeros): int16
    values in natural order [B, blocks * 64] and float32 steps [B, blocks]."""
    blocks = -(-k_pad // 64)
    padded = torch.nn.functional.pad(x.double(), (0, blocks * 64 - x.shape[1])).unflatten(-1, (blocks, 64))
    _, e = torch.frexp(padded.abs().amax(-1, keepdim=True))
    step = torch.ldexp(torch.ones_like(padded[..., :1]), e - 15)
    v = torch.round(padded / step).clamp(max=32767)
    assert torch.equal(step.float().double(), step)  # every step of these cases is a float32
    xr = (v * step).flatten(-2)[:, :x.shape[1]]
    assert torch.equal(xr, round_inputs_to_int16(x))
    return v.to(torch.int16).flatten(-2), step.squeeze(-1).float(), xr


def int8_inputs(x, k_pad):
    """x as the kernels receive it under set_quantized_activations("int8") (round_inputs_to_int8's
    arithmetic, padded to k_pad): int8 values in natural order [B, blocks * 128], float32 steps."""
    blocks = -(-k_pad // 128)
    padded = torch.nn.functional.pad(x.float(), (0, blocks * 128 - x.shape[1])).unflatten(-1, (blocks, 128))
    m, e = torch.frexp(padded.abs().amax(-1, keepdim=True))
    m = torch.where(m == 0, torch.ones_like(m), m)
    down = (padded.double() * torch.pow(2.0, -e.double())).float()
    v = torch.round(down * (torch.tensor(127.0) / m)).clamp(-127, 127)
    step = ((m / 127).double() * torch.pow(2.0, e.double())).float()
    xr = (v.double() * step.double()).flatten(-2)[:, :x.shape[1]]
    assert torch.equal(xr, round_inputs_to_int8(x))
    return v.to(torch.int8).flatten(-2), step.squeeze(-1), xr


SHAPES = OP_SHAPES + [(2, 700, 11, 192), (3, 96, 5, 64), (2, 160, 9, 128)]  # K % 64 == 32: a half last block


@pytest.mark.parametrize("vnni", [False, True], ids=["avx512bw", "avx512vnni"])
@pytest.mark.parametrize("B,K,N,G", SHAPES, ids=lambda v: str(v))
def test_avx512_int16_kernels_match_the_oracle(vnni, B, K, N, G):
    x = int16_case_x(B, K, seed=B + K)
    _, (q8, s8), (q4, s4) = op_case(B, K, N, G, torch.float32)
    v, step, xr = int16_inputs(x, K)
    check_against_oracle(emu.gemv_int8(v, step, q8, s8, vnni), xr, dequantize_int8(q8, s8))
    if G % 64 == 0:  # other groups keep float32 inputs (int4_group_takes_integer_inputs)
        k_pad = -(-K // 32) * 32
        v4, step4, xr4 = int16_inputs(x, k_pad)
        check_against_oracle(emu.gemv_int4(v4, step4, q4, s4, G, K, vnni), xr4, dequantize_int4(q4, s4, K, G))


@pytest.mark.parametrize("B,K,N,G", [(3, 700, 11, 128), (2, 160, 6, 64)], ids=lambda v: str(v))
def test_avx512_copies_agree_and_write_only_their_rows(B, K, N, G):
    """VNNI's vpdpwssd and AVX-512BW's vpmaddwd + add give the same integers, so the same bits;
    a row range [n0, n1) (rows four at a time, then one by one) writes those rows only."""
    x = int16_case_x(B, K, seed=5)
    _, (q8, s8), (q4, s4) = op_case(B, K, N, G, torch.float32)
    v, step, _ = int16_inputs(x, K)
    v4, step4, _ = int16_inputs(x, -(-K // 32) * 32)
    for n0, n1 in ((0, N), (1, N - 1), (2, 3)):
        a8, b8 = (emu.gemv_int8(v, step, q8, s8, vnni, n0, n1) for vnni in (False, True))
        a4, b4 = (emu.gemv_int4(v4, step4, q4, s4, G, K, vnni, n0, n1) for vnni in (False, True))
        for a, b in ((a8, b8), (a4, b4)):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
            assert not a[:, n0:n1].isnan().any() and a[:, :n0].isnan().all() and a[:, n1:].isnan().all()


def test_emulated_intrinsics_follow_intel():
    """The stand-ins where a slip would hide: vpmaddwd's wrap at (-32768)^2 * 2, the unsigned and
    signed byte widenings the two weight types take."""
    lo = torch.full((1, 64), -32768, dtype=torch.int16)
    q8 = torch.full((1, 64), -128, dtype=torch.int8)
    # int8: -128 * -32768 * 64 = 2^28 exactly (pairs 2^24 each: no wrap), times step 1, scale 1
    y = emu.gemv_int8(lo, torch.ones(1, 1), q8, torch.ones(1), vnni=False)
    assert y.item() == 2.0 ** 28
    # int4: nibble 0 stands for -8 (bytes 0x00); 0xff bytes are 7 in both nibbles
    q4 = torch.zeros(1, 32, dtype=torch.uint8)
    v = torch.arange(64, dtype=torch.int16).unsqueeze(0)
    scales = torch.ones(1, 1)
    assert emu.gemv_int4(v, torch.ones(1, 1), q4, scales, 64, 64, vnni=True).item() == -8 * sum(range(64))
    q4 = torch.full((1, 32), 0xff, dtype=torch.uint8)
    assert emu.gemv_int4(v, torch.ones(1, 1), q4, scales, 64, 64, vnni=False).item() == 7 * sum(range(64))


# int8 inputs take the AVX-512 kernel for groups of whole blocks of 128 (others: the AVX2 one)
INT8_INPUT_SHAPES = [(B, K, N, G) for B, K, N, G in SHAPES if G % 128 == 0] + [(3, 300, 5, 384), (2, 96, 6, 128)]


@pytest.mark.parametrize("vnni", [False, True], ids=["avx512bw", "avx512vnni"])
@pytest.mark.parametrize("B,K,N,G", INT8_INPUT_SHAPES, ids=lambda v: str(v))
def test_avx512_int4_kernel_with_int8_inputs_matches_the_oracle(vnni, B, K, N, G):
    x = int16_case_x(B, K, seed=B + K)
    _, _, (q4, s4) = op_case(B, K, N, G, torch.float32)
    v, step, xr = int8_inputs(x, -(-K // 32) * 32)
    y = emu.gemv_int4_int8_inputs(v, step, q4, s4, G, K, vnni)
    check_against_oracle(y, xr, dequantize_int4(q4, s4, K, G))
    if vnni:  # vpdpbusd and AVX-512BW's vpmaddubsw + vpmaddwd give the same integers
        torch.testing.assert_close(y, emu.gemv_int4_int8_inputs(v, step, q4, s4, G, K, False), rtol=0, atol=0)
    y = emu.gemv_int4_int8_inputs(v, step, q4, s4, G, K, vnni, 1, N)  # rows 1.. only
    assert y[:, 0].isnan().all() and not y[:, 1:].isnan().any()


def test_emulated_byte_products_follow_intel():
    """vpdpbusd takes a as unsigned bytes and b as signed ones: nibbles 15 (bytes 0xff) times -127
    over 128 inputs, less the offsets 8 * sum(x), is 7 * -127 * 128."""
    q4 = torch.full((1, 64), 0xff, dtype=torch.uint8)
    v = torch.full((1, 128), -127, dtype=torch.int8)
    for vnni in (False, True):
        y = emu.gemv_int4_int8_inputs(v, torch.ones(1, 1), q4, torch.ones(1, 1), 128, 128, vnni)
        assert y.item() == 7 * -127 * 128
