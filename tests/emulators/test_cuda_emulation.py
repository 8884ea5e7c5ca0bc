"""The CUDA kernels themselves, run on the CPU by the emulator in tests/cuda_emulation/, against
the float32 reference: the same cases as tests/gpu/test_cuda.py plus every code path a GPU run would
pick by shape or alignment (split plans, scalar and vector loads, each batch template), on
machines with no GPU. Also shows the emulator catches the CUDA misuse it claims to."""
import collections
import warnings

import pytest
import torch

from emu_fast import reference

import cuda_emulator as emu
from decoder_setup import LOOP_TOL, PROMPTS, Setup
from op_samples import CUDA_DTYPES, GPU_FP32_TOL, OPS, attention_case, check, close, samples

pytestmark = pytest.mark.skipif(emu.compiler() is None, reason="needs a C++ compiler to build the emulator")

DTYPES = CUDA_DTYPES


@pytest.fixture(autouse=True)
def _in_order_schedule():
    emu.set_schedule_seed(0)
    yield
    emu.set_schedule_seed(0)


def _close(actual, expected, dtype):  # as on a GPU
    close(actual, expected, dtype, GPU_FP32_TOL if dtype == torch.float32 else None)


# --- every op on every sample the CUDA kernels take (tests/op_samples.py) -------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sample", samples(cuda=True, emulate=True), ids=str)
def test_kernels_match_reference(sample, dtype):
    """Through the op's own host code (launch plan, size rules, composition) as on a GPU."""
    check(sample, getattr(emu, sample.op), sample.build("cpu", dtype), dtype, gpu=True)


# --- the emulator itself -------------------------------------------------------------------

def test_emulator_warp_shuffles_reduce_like_the_hardware():
    x = torch.randn(3 * 128)
    out = emu.selftest("warp_sums", x, blocks=3, threads=128)[: 3 * 4]
    torch.testing.assert_close(out, x.view(12, 32).sum(1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("which,blocks,threads,message", [
    ("barrier_after_return", 2, 64, r"__syncthreads reached after 1 threads of the block returned \(block \(0,0,0\)"),
    ("shuffle_missing_a_lane", 1, 32, r"deadlock: 0 threads wait at __syncthreads, 31 at a warp shuffle, 1 of 32"),
    ("warp_sums", 1, 2048, r"invalid launch configuration: grid \(1,1,1\), block \(2048,1,1\)"),
    ("warp_sums", 0, 32, r"invalid launch configuration: grid \(0,1,1\)"),
    ("write_past_the_end", 2, 64, r"out-of-bounds write next to a \(128,\) torch.float32 argument"),
    ("shuffle_partial_mask", 1, 32, r"warp shuffle with mask 65535; the kernels use full warps only"),
    ("null_dereference", 1, 32, r"segmentation fault at address \(nil\) in a kernel .*\(block \(0,0,0\) thread"),
    ("pdl_exit_without_wait", 2, 32, r"returned without griddepcontrol.wait .*\(block \(0,0,0\) thread \(7,0,0\)\)"),
    ("pdl_trigger_before_wait", 1, 32, r"launch_dependents before griddepcontrol.wait"),
])
def test_emulator_catches_cuda_misuse_and_stays_usable(which, blocks, threads, message):
    x = torch.randn(64)
    with pytest.raises(emu.CudaError, match=message):
        emu.selftest(which, x, blocks, threads)
    torch.testing.assert_close(emu.selftest("warp_sums", x, 1, 64)[:2], x.view(2, 32).sum(1), rtol=1e-5, atol=1e-5)


def test_emulator_runs_programmatic_dependent_launches_by_their_rules():
    """A PDL kernel that waits before it allows the next runs; every thread's wait is counted. The
    kernel that skips the wait on one path is fine as an ordinary launch (the rules are PDL's)."""
    x = torch.randn(128)
    torch.testing.assert_close(emu.selftest("pdl_copy", x, blocks=2, threads=64), x, rtol=0, atol=0)
    assert emu.last_launch_waits() == 128
    out = emu.selftest("plain_launch_exit_without_wait", x, blocks=2, threads=64)
    assert torch.isnan(out[7]) and torch.equal(torch.cat([out[:7], out[8:]]), torch.cat([x[:7], x[8:]]))


def test_emulator_shuffles_within_groups_of_lanes():
    x = torch.randn(64)
    out = emu.selftest("shuffle_width_8", x, blocks=1, threads=64)
    groups = x.view(8, 8)
    torch.testing.assert_close(out[:64], groups.sum(1).repeat_interleave(8), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[64:128], groups[:, 3].repeat_interleave(8), rtol=0, atol=0)


def test_emulator_poisons_shared_memory_per_block():
    """Shared memory nobody in the block wrote reads as NaN (a GPU gives garbage), in every
    block, not only the first."""
    out = emu.selftest("read_unwritten_shared", torch.zeros(1), blocks=3, threads=64)[:192].view(3, 64)
    assert (out[:, :32] == 1).all() and torch.isnan(out[:, 32:]).all()


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_emulator_blocks_with_a_short_last_warp(seed):
    """48 threads: the last warp has 16 lanes, in order and in random schedules."""
    emu.set_schedule_seed(seed)
    out = emu.selftest("racy_shared_write", torch.zeros(1), blocks=2, threads=48)[:2]
    assert ((out >= 0) & (out < 48)).all()


def test_emulator_reports_misaligned_vector_loads():
    if not emu.has_ubsan():
        pytest.skip("this compiler has no UBSan; the emulator was built without it")
    with pytest.raises(emu.CudaError, match=r"(?s)undefined behaviour in a kernel:.*misaligned address"):
        emu.selftest("misaligned_vector_load", torch.zeros(64), 1, 32)


def test_emulator_random_schedules_expose_a_race():
    """Seed 0 runs threads in index order; other seeds interleave them at random, so a result
    that depends on thread order changes across seeds (here, a racy shared-memory write)."""
    seen = set()
    for seed in range(6):
        emu.set_schedule_seed(seed)
        seen.add(emu.selftest("racy_shared_write", torch.zeros(1), blocks=1, threads=64)[0].item())
    assert len(seen) > 1


# --- decode attention ----------------------------------------------------------------------

def _attention_case(dtype, B, Hq, Hkv, D, S, lens, seed=0, cache_offset=0):
    return attention_case(B, Hq, Hkv, D, S, lens, dtype, seed=seed, cache_offset=cache_offset)


def _check_attention(dtype, case, sm_count=emu.H100_SMS, counters=False):
    """counters: the splits merged by the last block of each (sequence, KV head) through a zeroed
    counter buffer (as the decoder runs it), which must be all zeros again afterwards; without,
    by the combine kernel."""
    q, k, v, kc, vc, lens, pos, cos, sin = case
    D = q.shape[-1]
    kc_ref, vc_ref = kc.clone(), vc.clone()
    expected = reference.decode_attention(q, k, v, kc_ref, vc_ref, lens, pos, cos, sin, D ** -0.5)
    split_counters = torch.zeros(q.shape[0] * k.shape[1], dtype=torch.int32) if counters else None
    out = emu.decode_attention(q, k, v, kc, vc, lens, pos, cos, sin, split_counters=split_counters, sm_count=sm_count)
    _close(out, expected, dtype)
    _close(kc, kc_ref, dtype)
    torch.testing.assert_close(vc, vc_ref, rtol=0, atol=0)
    if counters:
        assert not split_counters.any(), "the last split leaves its counter at zero for the next call"
    return out


@pytest.mark.parametrize("counters", [False, True], ids=["combine-kernel", "last-block-merges"])
@pytest.mark.parametrize("sm_count", [1, 2, 4, 132])
def test_decode_attention_kernel_every_split_plan(sm_count, counters):
    """The same input under 2, 3, 6 and 8 splits (about 8 blocks per SM on GPUs of 1 to 132 SMs,
    at most one split per 64 cache rows; one split: the invalid-rows test below): each plan
    agrees with the reference, and the new token lands in whichever split holds its index."""
    dtype = torch.bfloat16
    assert emu.decode_attention_splits(3, 2, 500, sm_count) == max(1, min(-(-8 * sm_count // 6), -(-500 // 64)))
    _check_attention(dtype, _attention_case(dtype, 3, 4, 2, 128, 500, [499, 250, 64]), sm_count, counters)


@pytest.mark.parametrize("counters", [False, True], ids=["combine-kernel", "last-block-merges"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_attention_kernel_row_lengths_around_chunk_edges(dtype, counters):
    """Each row's keys are spread over the splits by its own length (read on the device), at
    least 16 a split: 7 splits here, and rows whose len + 1 falls below, on and above 16 per
    split and the edges of a chunk, all in one launch."""
    assert emu.decode_attention_splits(10, 4, 1024, 32) == 7  # a 32-SM GPU
    lens = [0, 1, 15, 16, 111, 112, 113, 118, 700, 1023]  # 7 splits: 16 keys each up to len 111
    _check_attention(dtype, _attention_case(dtype, len(lens), 8, 4, 64, 1024, lens), sm_count=32, counters=counters)


@pytest.mark.parametrize("seed", [0, 5, 6])
def test_decode_attention_split_counters_serve_call_after_call(seed):
    """One counter buffer through many calls (as the decoder keeps one for every layer and step),
    blocks in random orders: whichever split finishes last merges, and the counters are zero
    again after each call. A counter left non-zero would make a later call merge early."""
    dtype = torch.bfloat16
    emu.set_schedule_seed(seed)
    try:
        counters = torch.zeros(3 * 2, dtype=torch.int32)
        for call in range(4):
            q, k, v, kc, vc, lens, pos, cos, sin = _attention_case(dtype, 3, 4, 2, 64, 300, [299, 150 + call, 20],
                                                                   seed=call)
            kc_ref, vc_ref = kc.clone(), vc.clone()
            expected = reference.decode_attention(q, k, v, kc_ref, vc_ref, lens, pos, cos, sin, 64 ** -0.5)
            out = emu.decode_attention(q, k, v, kc, vc, lens, pos, cos, sin, split_counters=counters)
            _close(out, expected, dtype)
            assert not counters.any()
    finally:
        emu.set_schedule_seed(0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("D", [64, 128])
def test_decode_attention_kernel_misaligned_cache_uses_scalar_loads(dtype, D):
    _check_attention(dtype, _attention_case(dtype, 2, 4, 4, D, 130, [129, 70], cache_offset=1))


def test_decode_attention_kernel_invalid_rows_give_nan_and_leave_the_cache():
    """A full row and a row past the RoPE table give NaN and write nothing; the valid row in the
    same launch is right (with splits, and with one split)."""
    dtype, D, S = torch.float32, 128, 1024
    for sm_count in (132, 1):
        q, k, v, kc, vc, _, _, cos, sin = _attention_case(dtype, 3, 4, 4, D, S, [0, 0, 0])
        lens = torch.tensor([S, 500, 10])
        pos = torch.tensor([5, 500, 2 * S])
        kc0, vc0 = kc.clone(), vc.clone()
        counters = torch.zeros(3 * 4, dtype=torch.int32) if sm_count == 132 else None
        out = emu.decode_attention(q, k, v, kc, vc, lens, pos, cos, sin, split_counters=counters, sm_count=sm_count)
        assert torch.isnan(out[0]).all() and torch.isnan(out[2]).all()
        assert counters is None or not counters.any()
        kr, vr = kc0[1:2].clone(), vc0[1:2].clone()
        expected = reference.decode_attention(q[1:2], k[1:2], v[1:2], kr, vr, lens[1:2], pos[1:2], cos, sin, D ** -0.5)
        _close(out[1:2], expected, dtype)
        torch.testing.assert_close(kc[1:2], kr, rtol=0, atol=0)
        for row in (0, 2):
            torch.testing.assert_close(kc[row], kc0[row], rtol=0, atol=0)
            torch.testing.assert_close(vc[row], vc0[row], rtol=0, atol=0)


# --- GEMV and the regression head ----------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gemv_kernel_strided_and_misaligned_input(dtype):
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(40, 256, generator=g) * 0.06).to(dtype)
    wide = torch.randn(3, 300, generator=g).to(dtype)
    strided = wide[:, :256]          # row stride 300: aligned rows only in float32
    misaligned = wide[:, 1:257]      # starts one element in: scalar loads
    many = torch.randn(10, 300, generator=g).to(dtype)[:, 2:258]  # above batch 8: rows copied dense for the norm
    for x in (strided, misaligned, many):
        _close(emu.gemv(x, w), reference.gemv(x, w), dtype)
        nw = torch.ones(256, dtype=dtype)
        _close(emu.regression_head(x, nw, 1e-6, w)[0], reference.regression_head(x, nw, 1e-6, w)[0], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_gemv_silu_rounds_as_norm_gemv_then_silu_mul(dtype):
    """The tensor-core kernel's SiLU * mul epilogue (and the composition it falls back to) give
    bitwise the two kernels' result, on every sample: the decode step relies on it."""
    for s in samples(cuda=True, emulate=True):
        if s.op == "norm_gemv_silu":
            x, norm_w, eps, w = s.build("cpu", dtype)
            torch.testing.assert_close(emu.norm_gemv_silu(x, norm_w, eps, w),
                                       emu.silu_mul(emu.norm_gemv(x, norm_w, eps, w)), rtol=0, atol=0)


# --- thread order ---------------------------------------------------------------------------

def test_kernels_do_not_depend_on_thread_order():
    """Under random schedules (blocks in random order, warps running ahead of each other as far
    as the barriers and shuffles allow) every kernel gives bitwise the result of the in-order
    run: no missing barrier, no shared-memory race, no dependence on block order."""
    g = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16
    x, r = torch.randn(3, 700, generator=g).to(dtype), torch.randn(3, 700, generator=g).to(dtype)
    nw = (1 + 0.2 * torch.randn(700, generator=g)).to(dtype)
    w = (torch.randn(50, 700, generator=g) * 0.04).to(dtype)
    attention = _attention_case(dtype, 2, 8, 2, 64, 600, [599, 17])
    # K and I the tensor-core kernel's SiLU * mul epilogue takes
    xm, nwm, wm = x[:, :640].contiguous(), nw[:640].contiguous(), w[:48, :640].contiguous()

    def run_all():
        q, k, v, kc, vc, lens, pos, cos, sin = attention
        return [emu.rms_norm(x, nw, 1e-6), *emu.add_rms_norm(x, r, nw, 1e-6), emu.gemv(x, w),
                emu.regression_head(x, nw, 1e-6, w)[0], emu.norm_gemv_silu(xm, nwm, 1e-6, wm),
                emu.decode_attention(q, k, v, kc.clone(), vc.clone(), lens, pos, cos, sin),              # 10 splits
                emu.decode_attention(q, k, v, kc.clone(), vc.clone(), lens, pos, cos, sin,               # merged by
                                     split_counters=torch.zeros(4, dtype=torch.int32)),                 # the last
                emu.decode_attention(q, k, v, kc.clone(), vc.clone(), lens, pos, cos, sin, sm_count=1)]  # 1 split

    expected = run_all()
    for seed in (1, 2, 3):
        emu.set_schedule_seed(seed)
        for got, want in zip(run_all(), expected):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


# --- the whole decoder on the CUDA kernels --------------------------------------------------

@pytest.fixture
def cuda_kernels_as_cpu_ops():
    """For one test, the emulated CUDA kernels are the CPU implementations of the emu_fast ops,
    so EmuDecoder's own C++ step (op by op, the path it takes on a GPU) runs on them. Yields a
    counter of calls per op; the real CPU kernels are back afterwards."""
    calls = collections.Counter()

    def counted(name, fn):
        def op(*args):
            calls[name] += 1
            return fn(*args)
        return op

    impls = {name: getattr(emu, name) for name in {*OPS, "gemv_int8", "gemv_int4"}}  # each has its emulator wrapper
    lib = torch.library.Library("emu_fast", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
        for name, fn in impls.items():
            lib.impl(name, counted(name, fn), "CPU")
    try:
        yield calls
    finally:
        lib._destroy()
    before = sum(calls.values())
    torch.ops.emu_fast.gemv(torch.randn(1, 8), torch.randn(4, 8))
    assert sum(calls.values()) == before, "the real CPU kernels were not restored"


@pytest.mark.parametrize("kind,hidden", [("emu1", 256), ("emu2", 256), ("emu1", 512)])  # head dim 64, 64, 128
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoder_on_the_cuda_kernels_matches_upstream_loop(emu_tokenizer, cuda_kernels_as_cpu_ops, kind, hidden, dtype):
    """The same assertion as test_cuda.py's decoder test (loop tolerance per dtype against the
    float32 upstream loop), with every op of prefill and step on the CUDA kernels; 4 heads, 2
    KV heads, ragged batch of 3. (float16 EmuDecoders exist on CUDA only; its kernels are
    tested op by op above.)"""
    s = Setup(kind, emu_tokenizer, kv_heads=2, n=6, dtype=dtype, hidden=hidden, out_dim=96)
    dec = s.decoder(kernels="custom")  # ours in prefill too, and no self-check step
    dec.fused_cpu_step = False
    out = dec.generate(*s.inputs(PROMPTS[3]), s.n)
    from emu_fast.testing import rel_err

    err = rel_err(out, s.expected(PROMPTS[3]))
    assert err < LOOP_TOL[dtype]
    calls = cuda_kernels_as_cpu_ops
    for op in ("norm_gemv", "norm_gemv_silu", "decode_attention", "gemv_add", "silu_mul", "regression_head",
               "rms_norm"):
        assert calls[op] > 0, op
    assert calls["decode_attention"] == (s.n - 1) * s.shape.layers


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_decoder_on_the_cuda_kernels_matches_the_fused_cpu_step(emu_tokenizer, cuda_kernels_as_cpu_ops,
                                                                           scheme, dtype):
    """The quantized decoder's op-by-op step (what it runs on a GPU: gemv_int8 / gemv_int4, on
    tensor cores in bf16) on the emulated CUDA kernels, against the CPU's fused step (its own
    kernels, which test_quantized_decoder.py holds to the dequantized reference). Emu2-shaped,
    hidden 256, MLP 96 (int4's last group short, its last step's lanes past the row)."""
    from emu_fast.testing import rel_err

    s = Setup("emu2", emu_tokenizer, kv_heads=2, n=6, dtype=dtype, hidden=256, out_dim=96)
    dec = s.decoder(kernels="custom", weights=scheme)  # quantizes s.lm in place (group 128 for int4)
    inputs = s.inputs(PROMPTS[3])
    fused = dec.generate(*inputs, s.n)
    steps_before = cuda_kernels_as_cpu_ops[f"gemv_{scheme}"]
    dec.fused_cpu_step = False
    out = dec.generate(*inputs, s.n)
    assert cuda_kernels_as_cpu_ops[f"gemv_{scheme}"] - steps_before >= 4 * s.shape.layers * (s.n - 1)
    assert rel_err(out, fused) < (1e-4 if dtype == torch.float32 else LOOP_TOL[dtype])


# --- weight-only int8 / int4 GEMV -----------------------------------------------------------

def _quantized_case(scheme, B, K, N, dtype, group=128, seed=0, x_offset=0):
    """x (x_offset elements into its buffer: misaligned rows for x_offset % 8 != 0), the quantized
    weight with a zero row (scale 0), and the op's arguments."""
    from emu_fast.quant import schemes as quantize
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * K ** -0.5
    w[N // 2] = 0
    x = (torch.randn(B * K + x_offset, generator=g)[x_offset:].view(B, K)).to(dtype)
    if scheme == "int8":
        return x, quantize.quantize_int8(w)
    q, s = quantize.quantize_int4(w, group)
    return x, (q, s, group)


# float32 x: the CUDA-core kernel; bf16 x: the tensor-core kernel where it applies (int8 with
# K % 16 == 0, int4 with groups of 128 or 256), else the CUDA-core one.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scheme,B,K,N,group", [
    ("int8", 1, 512, 40, None),   # vectors, 4 in flight per lane, and the last ones
    ("int8", 3, 272, 17, None),   # the batch-4 instance with a row past the batch; rows past N
    ("int8", 11, 96, 9, None),    # two launches: 8 rows, then 3
    ("int8", 2, 100, 7, None),    # K % 16 != 0: the scalar loop
    ("int4", 1, 1024, 24, 128),   # vectors, several groups
    ("int4", 5, 100, 13, 32),     # K padded to 128 with zeros, a short last group
    ("int4", 9, 320, 8, 64),      # two launches
    # bf16 with groups of whole 128-input steps: the tensor-core kernel (quantized_mma_gemv.cuh)
    ("int4", 3, 200, 21, 128),    # 7 blocks (the last step's lanes past the row), 21 rows (a part tile)
    ("int4", 11, 256, 40, 128),   # two launches: 8 batch rows (the whole mma N), then 3
    ("int4", 2, 600, 18, 256),    # groups of two steps, a short last group
])
def test_quantized_gemv_kernels_match_reference(dtype, scheme, B, K, N, group):
    """The CUDA kernels against x @ dequantize(...)^T (emu_fast/quant/schemes.py, the scheme's
    definition) on every path: vector widths, template batches, batch chunks, int8's scalar loop,
    int4's zero-padded blocks and short groups; a zero row gives zeros."""
    x, args = _quantized_case(scheme, B, K, N, dtype, group or 128)
    op = emu.gemv_int8 if scheme == "int8" else emu.gemv_int4
    out = op(x, *args)
    expected = getattr(reference, f"gemv_{scheme}")(x, *args)
    assert out.shape == (B, N) and out.dtype == dtype
    _close(out, expected, dtype)
    assert not out[:, N // 2].any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scheme,K", [("int8", 256), ("int8", 250), ("int4", 256), ("int4", 250)])
def test_quantized_gemv_kernels_take_every_stored_byte(scheme, K, dtype):
    """Every byte a qweight can hold (int8 -128..127; int4 nibbles 0..15, i.e. q = -8..7, which
    the quantizer never writes but a file may hold), each in every position of a word: the
    kernels' bit-level conversion (no I2F) gives the value the scheme defines. int8 also through
    its scalar loop (K % 16 != 0), int4 with a zero-padded last block, in bf16 on the
    tensor-core kernel (its bf16 pairs built from the bits)."""
    from emu_fast.quant.schemes import int4_row_bytes
    row_bytes = K if scheme == "int8" else int4_row_bytes(K)
    q = torch.arange(8 * 256, dtype=torch.int64).remainder(256)  # 0..255, eight times
    q = q[torch.randperm(q.numel(), generator=torch.Generator().manual_seed(0))][: 8 * row_bytes]
    q = q.view(8, row_bytes).to(torch.uint8)
    x = torch.randn(2, K, generator=torch.Generator().manual_seed(1)).to(dtype)
    if scheme == "int8":
        args = (q.view(torch.int8), torch.rand(8, generator=torch.Generator().manual_seed(2)) + 0.5)
        out, expected = emu.gemv_int8(x, *args), reference.gemv_int8(x, *args)
    else:
        args = (q, torch.rand(8, 2, generator=torch.Generator().manual_seed(2)) + 0.5, 128)
        out, expected = emu.gemv_int4(x, *args), reference.gemv_int4(x, *args)
    _close(out, expected, dtype)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_gemv_kernels_read_misaligned_and_strided_x(scheme):
    """x starting one element into its buffer, or a strided slice: the glue copies it dense
    (int4: padded); same answer as the aligned x."""
    dtype = torch.bfloat16
    x_bad, args = _quantized_case(scheme, 3, 256, 16, dtype, x_offset=1)
    op = emu.gemv_int8 if scheme == "int8" else emu.gemv_int4
    expected = op(x_bad.clone(), *args)
    torch.testing.assert_close(op(x_bad, *args), expected, rtol=0, atol=0)
    wide = torch.zeros(3, 300, dtype=dtype)
    wide[:, :256] = x_bad
    torch.testing.assert_close(op(wide[:, :256], *args), expected, rtol=0, atol=0)


@pytest.mark.parametrize("scheme,group", [("int8", None), ("int4", 64), ("int4", 128)])  # int4 128: tensor cores
def test_quantized_gemv_kernels_do_not_depend_on_thread_order(scheme, group):
    x, args = _quantized_case(scheme, 5, 384, 20, torch.bfloat16, group=group or 64)
    op = emu.gemv_int8 if scheme == "int8" else emu.gemv_int4
    in_order = op(x, *args)
    for seed in (1, 2):
        emu.set_schedule_seed(seed)
        torch.testing.assert_close(op(x, *args), in_order, rtol=0, atol=0)
