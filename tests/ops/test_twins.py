"""Each emu_fast op has its parts: a schema with an ATen twin of the same signature
(emu_fast_aten::<op>, the op in plain ATen that the portable step runs and the self-check compares
ours to), a fake implementation (emu_fast/ops.py), samples (tests/op_samples.py; the quantized
GEMVs' in the quantization tests) and a CUDA-emulator entry (tests/cuda_emulator.py). And each
twin keeps the op's promises on every sample, against emu_fast.reference."""
import pytest
import torch

import cuda_emulator
import emu_fast  # noqa: F401  (loads the ops)
from op_samples import CPU_DTYPES, OPS, check, samples

# Samples for these live with the weight schemes' tests (their inputs are quantized weights).
QUANTIZED = {"gemv_int8", "gemv_int4"}


def _schemas(namespace):
    return {s.name.split("::", 1)[1]: s for s in torch._C._jit_get_all_schemas() if s.name.startswith(namespace + "::")}


def test_every_op_has_a_twin_a_fake_samples_and_an_emulator_entry():
    ours, twins = _schemas("emu_fast"), _schemas("emu_fast_aten")
    assert ours and set(ours) == set(twins), set(ours) ^ set(twins)
    for name, schema in ours.items():
        assert str(schema).split("::", 1)[1] == str(twins[name]).split("::", 1)[1], name
        entry = torch._library.simple_registry.singleton.find(f"emu_fast::{name}")
        assert entry.fake_impl.kernel is not None, f"emu_fast::{name} has no register_fake (emu_fast/ops.py)"
        assert name in OPS or name in QUANTIZED, f"emu_fast::{name} has no samples in tests/op_samples.py"
        assert callable(getattr(cuda_emulator, name, None)), f"emu_fast::{name} has no tests/cuda_emulator.py entry"


def _twin(op):
    fn = getattr(torch.ops.emu_fast_aten, op)
    if op != "decode_attention":
        return fn

    def decode_attention(q, k, v, k_cache, v_cache, cache_lens, positions, rope_cos, rope_sin, split_counters=None):
        return fn(q, k, v, k_cache, v_cache, cache_lens, positions, rope_cos, rope_sin, q.shape[-1] ** -0.5,
                  split_counters)

    return decode_attention


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("sample", samples(), ids=str)
def test_aten_twin_matches_reference_cpu(sample, dtype):
    check(sample, _twin(sample.op), sample.build("cpu", dtype), dtype)


def test_quantized_twins_compute_as_the_kernels():
    """gemv_int8 / gemv_int4's twins against the CPU kernels on the same quantized weights: the twin
    rounds 16-bit inputs as the kernels take them, so the two differ by float32 summation order."""
    from emu_fast.quant.schemes import quantize_int4, quantize_int8

    g = torch.Generator().manual_seed(0)
    w = torch.randn(70, 200, generator=g)
    q8, s8 = quantize_int8(w)
    q4, s4 = quantize_int4(w, group_size=64)
    for dtype in CPU_DTYPES:
        x = torch.randn(3, 200, generator=g).to(dtype)
        for name, args in (("gemv_int8", (x, q8, s8)), ("gemv_int4", (x, q4, s4, 64))):
            ours = getattr(torch.ops.emu_fast, name)(*args).float()
            twin = getattr(torch.ops.emu_fast_aten, name)(*args).float()
            # float32 sums in another order, then one rounding to the dtype (half an ulp of it)
            tol = 1e-5 if dtype == torch.float32 else 2.0 ** -8
            torch.testing.assert_close(twin, ours, rtol=tol, atol=tol * ours.abs().max().item())
