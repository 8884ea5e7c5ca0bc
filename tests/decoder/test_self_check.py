"""The first-use self-check (csrc/self_check.h, EmuDecoder::checked_step): in kernels="auto" mode
the first decode step at each batch size runs on our kernels and on ATen's from the same cache;
on a mismatch the decoder warns once (naming the op, or the fused CPU step, and the batch size)
and runs the ATen step for good. On the CPU a test-only switch (emu_fast._C._set_test_fault)
makes one of our kernels wrong on purpose (its output + 1): the fallback still gives the
upstream loop's answer, while the same fault unchecked (EMU_FAST_SELF_CHECK=0, or
kernels="custom") gives a wrong one. Without a fault the check changes nothing, bit for bit."""
import warnings

import pytest
import torch

import emu_fast
from emu_fast import _C
from emu_fast.testing import rel_err, tiny_emu

from decoder_setup import LOOP_TOL, PROMPTS, Setup

# Every custom decode-step kernel, each made wrong in turn (with the fused CPU step off, so the
# step runs op by op), and the fused CPU step itself. gemv is Emu2's alone (project_up); the
# norms run inside norm_gemv, the residual adds inside gemv_add and SiLU * mul inside
# norm_gemv_silu.
OPS = ["norm_gemv", "gemv_add", "norm_gemv_silu", "decode_attention", "regression_head"]
FUSED = "decode_step"  # the fused CPU step (decoder.fused_cpu_step, the default on the CPU)
TEXTS = PROMPTS[3]  # ragged: three prompts of different lengths

def _message(op):
    return "the fused CPU decode step disagrees" if op == FUSED else f"the custom {op} kernel disagrees"


@pytest.fixture(autouse=True)
def _check_on(monkeypatch):
    """The check as it runs by default, whatever the caller's environment says."""
    monkeypatch.delenv("EMU_FAST_SELF_CHECK", raising=False)


@pytest.fixture
def fault():
    """Sets the process-wide test fault; always cleared afterwards."""
    try:
        yield _C._set_test_fault
    finally:
        _C._set_test_fault("")


def _runtime_warnings(fn, *args):
    """fn(*args) and the RuntimeWarnings it raised (every one, none filtered or deduplicated)."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        result = fn(*args)
    return result, [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)]


def _decoder(s, op, **kwargs):
    """A decoder whose step takes the faulty kernel: the fused CPU step for "decode_step", op by
    op for the others (the fused step does not call the custom ops)."""
    dec = s.decoder(**kwargs)
    dec.fused_cpu_step = op == FUSED
    return dec


def _assert_fell_back(dec, messages, op, batch):
    assert len(messages) == 1, messages
    assert _message(op) in messages[0] and f"at batch size {batch}" in messages[0], messages[0]
    assert dec.kernels == "aten" and dec.kernel_mode == "auto"
    assert dec.fallback_reason == messages[0]


FALLBACK_CASES = (
    [pytest.param("emu1", op, torch.float32, id=f"emu1-{op}-float32") for op in OPS + [FUSED]]
    + [pytest.param("emu2", op, torch.float32, id=f"emu2-{op}-float32")
       for op in ["gemv", "norm_gemv", "decode_attention", "regression_head", FUSED]]
    + [pytest.param(kind, op, torch.bfloat16, id=f"{kind}-{op}-bfloat16")
       for kind, op in [("emu1", "gemv_add"), ("emu2", "norm_gemv_silu"), ("emu2", FUSED)]]
)


@pytest.mark.parametrize("kind, op, dtype", FALLBACK_CASES)
def test_wrong_kernel_falls_back_with_one_warning(emu_tokenizer, fault, kind, op, dtype):
    s = Setup(kind, emu_tokenizer, kv_heads=2, dtype=dtype)
    dec = _decoder(s, op)
    assert dec.kernels == "custom" and dec.fallback_reason == ""
    inputs, expected, tol = s.inputs(TEXTS), s.expected(TEXTS), LOOP_TOL[dtype]
    fault(op)
    out, messages = _runtime_warnings(dec.generate, *inputs, s.n)
    _assert_fell_back(dec, messages, op, 3)
    # The fault is still set: the ATen step is what gives the right answer.
    again, more = _runtime_warnings(dec.generate, *inputs, s.n)
    assert more == []  # once per decoder
    assert dec.kernels == "aten"
    assert rel_err(out, expected) < tol
    assert rel_err(again, expected) < tol


@pytest.mark.parametrize("kind, op", [("emu1", "norm_gemv"), ("emu2", "decode_attention"), ("emu2", FUSED)])
@pytest.mark.parametrize("unchecked", ["EMU_FAST_SELF_CHECK=0", "kernels=custom"])
def test_unchecked_fault_gives_a_wrong_answer(emu_tokenizer, fault, monkeypatch, kind, op, unchecked):
    """The control: the switch really breaks the kernel, and only the check saves the answer."""
    s = Setup(kind, emu_tokenizer, kv_heads=2)
    if unchecked == "kernels=custom":
        dec = _decoder(s, op, kernels="custom")
    else:
        monkeypatch.setenv("EMU_FAST_SELF_CHECK", "0")
        dec = _decoder(s, op)
    fault(op)
    out, messages = _runtime_warnings(dec.generate, *s.inputs(TEXTS), s.n)
    assert messages == []
    assert dec.kernels == "custom" and dec.fallback_reason == ""
    assert rel_err(out, s.expected(TEXTS)) > 100 * LOOP_TOL[torch.float32]


@pytest.mark.parametrize("kind", ["emu1", "emu2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "op_by_op"])
def test_passing_check_changes_nothing(emu_tokenizer, monkeypatch, kind, dtype, fused):
    """No fault: the check passes, and the checked decoder's outputs equal an unchecked one's bit
    for bit (our step writes its cache entries last)."""
    s = Setup(kind, emu_tokenizer, kv_heads=2, dtype=dtype)
    checked, unchecked = s.decoder(), s.decoder()
    checked.fused_cpu_step = unchecked.fused_cpu_step = fused
    inputs = s.inputs(TEXTS)
    out, messages = _runtime_warnings(checked.generate, *inputs, s.n)
    assert messages == []
    assert checked.kernels == "custom" and checked.kernel_mode == "auto" and checked.fallback_reason == ""
    monkeypatch.setenv("EMU_FAST_SELF_CHECK", "0")
    reference = unchecked.generate(*inputs, s.n)
    assert torch.equal(out, reference)
    assert rel_err(out, s.expected(TEXTS)) < LOOP_TOL[dtype]


def test_check_runs_once_per_batch_size(emu_tokenizer, fault):
    """The contract: each batch size is checked at its first decode only. A kernel that turns
    wrong later is not caught at a batch size already checked, and is at a new one."""
    s = Setup("emu2", emu_tokenizer, kv_heads=2)
    dec = _decoder(s, "norm_gemv_silu")
    three, two = TEXTS, TEXTS[:2]
    _, messages = _runtime_warnings(dec.generate, *s.inputs(three), s.n)
    assert messages == [] and dec.kernels == "custom"
    fault("norm_gemv_silu")
    out, messages = _runtime_warnings(dec.generate, *s.inputs(three), s.n)  # batch 3: checked already
    assert messages == [] and dec.kernels == "custom"
    assert rel_err(out, s.expected(three)) > 100 * LOOP_TOL[torch.float32]
    out, messages = _runtime_warnings(dec.generate, *s.inputs(two), s.n)  # batch 2: new
    _assert_fell_back(dec, messages, "norm_gemv_silu", 2)
    assert rel_err(out, s.expected(two)) < LOOP_TOL[torch.float32]
    out, messages = _runtime_warnings(dec.generate, *s.inputs(three), s.n)  # now on ATen
    assert messages == [] and dec.kernels == "aten"
    assert rel_err(out, s.expected(three)) < LOOP_TOL[torch.float32]


@pytest.mark.parametrize("kind, op", [("emu1", "gemv_add"), ("emu2", "norm_gemv"), ("emu2", FUSED), ("emu2", "gemv")])
def test_step_api_checks_a_new_batch_size(emu_tokenizer, fault, kind, op):
    """prefill + step(), the service API: the first step() at a batch size runs the check and
    raises the warning; the steps after it run on ATen."""
    s = Setup(kind, emu_tokenizer, kv_heads=2)
    dec = _decoder(s, op)
    fault(op)
    outs = [dec.prefill(*s.inputs(TEXTS))]  # prefill in "auto" mode runs ATen's glue: no check
    assert dec.kernels == "custom" and dec.fallback_reason == ""
    with pytest.warns(RuntimeWarning, match="at batch size 3") as record:
        outs.append(dec.step(outs[-1]))
    messages = [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)]
    _assert_fell_back(dec, messages, op, 3)
    for _ in range(s.n - 2):
        out, messages = _runtime_warnings(dec.step, outs[-1])
        assert messages == []
        outs.append(out)
    assert rel_err(torch.stack(outs, 1), s.expected(TEXTS)) < LOOP_TOL[torch.float32]


@pytest.mark.parametrize("kind, op", [("emu1", FUSED), ("emu2", "decode_attention")])
def test_accelerate_drop_in_falls_back(fault, kind, op):
    model = tiny_emu(kind, kv_heads=2)
    texts = ["a photo of a cat", "a red bicycle leaning on a wall at night"]
    expected = model.generate_image(texts)  # upstream's loop, before accelerate
    emu_fast.accelerate(model)
    model.emu_fast_decoder.fused_cpu_step = op == FUSED
    fault(op)
    out, messages = _runtime_warnings(model.generate_image, texts)
    _assert_fell_back(model.emu_fast_decoder, messages, op, 2)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_setting_flipped_and_back_during_the_check_is_not_judged(emu_tokenizer):
    """Another thread sets set_quantized_activations("int8") and back to "auto" while the checked
    step runs (int8 weights, float32): the two steps may have taken different inputs, and a step
    during which the setting was set at all (a process-wide count, read before and after) is not
    judged. Comparing the setting itself before and after missed a flip and a flip back, and
    blamed a correct kernel in most of 6 fresh decoders."""
    import threading

    stop = threading.Event()

    def flip():
        while not stop.is_set():
            emu_fast.set_quantized_activations("int8")
            emu_fast.set_quantized_activations("auto")

    reasons = []
    flipper = threading.Thread(target=flip, daemon=True)
    flipper.start()
    try:
        for seed in range(6):
            model = emu_fast.accelerate(tiny_emu("emu2", tokenizer=emu_tokenizer, kv_heads=2, seed=seed),
                                        weights="int8")
            model.generate_image(TEXTS)
            reasons.append(model.emu_fast_decoder.fallback_reason)
    finally:
        stop.set()
        flipper.join()
        emu_fast.set_quantized_activations("auto")
    assert reasons == [""] * 6, reasons


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "op_by_op"])
def test_setting_set_and_set_back_around_our_step_is_not_judged(emu_tokenizer, fault, fused):
    """The same, deterministic: a test hook sets int8 inputs for the checked step's run of our
    kernels and sets the setting back after it, so ours and ATen's took different inputs though
    the setting reads the same before and after. The step is not judged (no warning, our kernels
    stay); once the hook is off, the next generation checks and passes."""
    model = emu_fast.accelerate(tiny_emu("emu2", tokenizer=emu_tokenizer, kv_heads=2), weights="int8")
    dec = model.emu_fast_decoder
    dec.fused_cpu_step = fused
    fault("flip_quantized_input")
    _, messages = _runtime_warnings(model.generate_image, TEXTS)
    assert messages == [] and dec.kernels == "custom" and dec.fallback_reason == ""
    assert emu_fast.quantized_activations() == "auto"
    fault("")
    _, messages = _runtime_warnings(model.generate_image, TEXTS)
    assert messages == [] and dec.kernels == "custom" and dec.fallback_reason == ""


@pytest.mark.parametrize("scheme,dtype", [("int8", torch.float32), ("int4", torch.float32),
                                          ("int4", torch.bfloat16)], ids=["int8-fp32", "int4-fp32", "int4-bf16"])
def test_subnormal_weight_scales_pass_the_check(emu_tokenizer, scheme, dtype):
    """Weight scales taken down to subnormal floats (the quantizer writes none and load_quantized
    refuses them, but a model can be given them): the ATen step computes as the kernels do, the
    scale applied after each row's or group's sum of integer weights times x, so it agrees with
    ours. It dequantized the weight first, in x's dtype, rounding every weight times a subnormal
    scale to the few bits left there, and blamed ours (int4 bf16: relative error 0.2). bf16 here
    is int4 in groups of 32, whose kernels take float32 inputs; the int16-input kernels scale each
    block's sum by its step times the weight scale, which itself underflows for scales this small
    (a limit of those kernels, not of the check)."""
    model = emu_fast.accelerate(tiny_emu("emu2", tokenizer=emu_tokenizer, kv_heads=2, dtype=dtype),
                                weights=scheme, group_size=32 if scheme == "int4" else None)
    with torch.no_grad():
        for layer in model.decoder.lm.model.layers:
            for m in layer.modules():
                if hasattr(m, "scales"):
                    m.scales.mul_(2.0 ** -128)   # ~1e-2 -> ~2^-135: subnormal, ~14 bits left
    scales = [m.scales for m in model.decoder.lm.modules() if hasattr(m, "scales")]
    assert all(bool((s < torch.finfo(torch.float32).tiny).all()) for s in scales)
    _, messages = _runtime_warnings(model.generate_image, TEXTS)
    assert messages == [] and model.emu_fast_decoder.fallback_reason == ""
