"""The CPU ops gemv_int8 / gemv_int4 against the pure-PyTorch reference on every instruction set
this processor has; the ISA hook, strided and empty inputs, opcheck, the fake kernels, bad input."""
import pytest
import torch

from emu_fast import _C, ops, reference
from emu_fast.quant.schemes import dequantize_int4, dequantize_int8, quantize_int4, quantize_int8
from quant_samples import ISAS, OP_SHAPES, available_isas, check_against_reference, op_case, with_isa


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


def test_isa_hook():
    have = available_isas()
    assert have[-1] == "portable" and len(have) >= 1
    for isa in ISAS:
        if isa not in have:  # a processor without it: the hook refuses, and nothing changes
            assert _C._set_cpu_isa(isa) is False
    with pytest.raises(ValueError, match="unknown instruction set"):
        _C._set_cpu_isa("sse9")


# The level each (weight, input, group) runs at, as the kernel tables claim: every pair at the
# level itself, but int4 x int8 on AVX-512 only for groups of whole 128-input blocks (else the
# AVX2 kernel).
def expected_level(isa, bits, inputs, group):
    if isa == "avx512" and bits == 4 and inputs == "int8" and group % 128:
        return "avx2"
    return isa


@pytest.mark.parametrize("bits,inputs,group", [(8, "float32", 1), (8, "int16", 1), (8, "int8", 1),
                                               (4, "float32", 32), (4, "int16", 64), (4, "int8", 64),
                                               (4, "int8", 128)])
def test_each_level_runs_its_own_kernels(bits, inputs, group):
    """A level the processor has serves the products its table claims (a table that is silently
    empty, e.g. compiled without its instruction set, would fall back to the generic loops, whose
    results are also correct)."""
    for isa in available_isas():
        level = with_isa(isa, lambda: _C._quantized_gemv_level(bits, inputs, group))
        assert level == expected_level(isa, bits, inputs, group), (isa, bits, inputs, group)


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
