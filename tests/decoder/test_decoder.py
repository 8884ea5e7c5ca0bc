"""EmuDecoder (C++ prefill + step with a KV cache) against the reference upstream recompute loop
run on the pure-PyTorch LLaMA body: Emu1 and Emu2 shapes, right and left padding, with and
without prompt images, batch 1 and ragged batches; reuse, side-by-side decoders, bad input."""
import pytest
import torch

from emu_fast import EmuDecoder
from emu_fast.dropin.packing import pack_layers
from emu_fast.testing import rel_err

from decoder_setup import LOOP_TOL, PROMPTS, Setup

FP32_TOL, BF16_TOL = LOOP_TOL[torch.float32], LOOP_TOL[torch.bfloat16]


def _images(texts, n, hidden, seed=5):
    count = sum(t.count("[<IMG_PLH>]") for t in texts) * n
    return torch.randn(count, hidden, generator=torch.Generator().manual_seed(seed)) if count else None


@pytest.mark.parametrize("kind", ["emu1", "emu2"])
@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("with_images", [False, True])
def test_decoder_matches_upstream_loop(emu_tokenizer, kind, kv_heads, batch, with_images):
    s = Setup(kind, emu_tokenizer, kv_heads=kv_heads)
    texts = PROMPTS[batch]
    if with_images and batch == 1:
        texts = ["look [<IMG_PLH>] and [<IMG_PLH>] then draw"]
    images = _images(texts, s.n, 64) if with_images else None
    out = s.decoder().generate(*s.inputs(texts, images), s.n)
    expected = s.expected(texts, images)
    assert out.shape == expected.shape == (len(texts), s.n, s.head.shape[0])
    assert rel_err(out, expected) < FP32_TOL


@pytest.mark.parametrize("kind", ["emu1", "emu2"])
def test_decoder_bfloat16(emu_tokenizer, kind):
    s = Setup(kind, emu_tokenizer, kv_heads=2, dtype=torch.bfloat16)
    texts = PROMPTS[3]
    images = _images(texts, s.n, 64)
    out = s.decoder().generate(*s.inputs(texts, images), s.n)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, s.expected(texts, images)) < BF16_TOL


def test_prefill_then_steps_by_hand(emu_tokenizer):
    """prefill/step, the service API, give what generate gives, and lengths grow by one a step."""
    s = Setup("emu2", emu_tokenizer)
    embeds, mask = s.inputs(PROMPTS[3])
    dec = s.decoder()
    out = dec.prefill(embeds, mask)
    assert dec.batch_size == 3 and dec.lengths == mask.sum(1).tolist()
    outs = [out]
    for _ in range(s.n - 1):
        outs.append(dec.step(outs[-1]))
    assert dec.lengths == (mask.sum(1) + s.n - 1).tolist()
    assert rel_err(torch.stack(outs, 1), s.expected(PROMPTS[3])) < FP32_TOL


def test_step_takes_any_previous_output(emu_tokenizer):
    """Emu2's project_up is computed from whatever step is handed: the returned tensor, a copy
    or an in-place edit of it give the same as a fresh tensor with those values."""
    s = Setup("emu2", emu_tokenizer)
    embeds, mask = s.inputs(PROMPTS[3])
    a, b = s.decoder(), s.decoder()
    out_a, out_b = a.prefill(embeds, mask), b.prefill(embeds, mask)
    torch.testing.assert_close(a.step(out_a), b.step(out_b.clone()), rtol=0, atol=0)
    out_a, out_b = a.step(out_a), b.step(out_b)
    out_a.mul_(0.5)
    torch.testing.assert_close(a.step(out_a), b.step(out_b.clone() * 0.5), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("write", ["numpy", "data"])
def test_step_sees_writes_that_bump_no_version_counter(emu_tokenizer, write):
    """Writes through .numpy() or .data leave the version counter alone: step must still use
    the tensor's current values (it used to reuse a stale cached project_up)."""
    s = Setup("emu2", emu_tokenizer)
    embeds, mask = s.inputs(PROMPTS[3])
    a, b = s.decoder(), s.decoder()
    out_a, out_b = a.prefill(embeds, mask), b.prefill(embeds, mask)
    version = out_a._version
    if write == "numpy":
        out_a.numpy()[:] *= -3.0
    else:
        out_a.data.mul_(-3.0)
    assert out_a._version == version  # the write is invisible to the version counter
    step_a, step_b = a.step(out_a), b.step(out_b.clone() * -3.0)
    torch.testing.assert_close(step_a, step_b, rtol=0, atol=0)
    step_a.numpy()[:] *= 2.0  # decode, too, reads prev afresh
    torch.testing.assert_close(a.decode(step_a, 2), b.decode(step_b.clone() * 2.0, 2), rtol=0, atol=0)


def test_reset_and_reuse_without_reallocating(emu_tokenizer):
    s = Setup("emu1", emu_tokenizer)
    dec = s.decoder()
    first = dec.generate(*s.inputs(PROMPTS[3]), s.n)
    cache_ptr = dec.kv_cache.data_ptr()  # the cache is allocated by the first request
    other = dec.generate(*s.inputs(PROMPTS[1]), s.n)
    again = dec.generate(*s.inputs(PROMPTS[3]), s.n)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert rel_err(other, s.expected(PROMPTS[1])) < FP32_TOL
    dec.reset()
    assert dec.batch_size == 0 and dec.kv_cache.data_ptr() == cache_ptr
    with pytest.raises(ValueError, match="call prefill"):
        dec.step(first[:, 0])


def test_decoders_side_by_side(emu_tokenizer):
    """Two decoders over the same weights, stepped alternately, do not disturb each other."""
    s = Setup("emu2", emu_tokenizer)
    a, b = s.decoder(), s.decoder(max_batch=2, max_seq_len=64)
    ia, ib = s.inputs(PROMPTS[3]), s.inputs(PROMPTS[1])
    oa, ob = [a.prefill(*ia)], [b.prefill(*ib)]
    for _ in range(s.n - 1):
        oa.append(a.step(oa[-1]))
        ob.append(b.step(ob[-1]))
    assert rel_err(torch.stack(oa, 1), s.expected(PROMPTS[3])) < FP32_TOL
    assert rel_err(torch.stack(ob, 1), s.expected(PROMPTS[1])) < FP32_TOL


def test_capacity_errors_leave_decoder_usable(emu_tokenizer):
    s = Setup("emu1", emu_tokenizer)
    embeds, mask = s.inputs(PROMPTS[3])
    T = embeds.shape[1]
    dec = s.decoder(max_batch=2, max_seq_len=T + s.n - 1)
    with pytest.raises(ValueError, match="batch of 3 prompts exceeds the decoder's max_batch of 2"):
        dec.prefill(embeds, mask)
    small = s.decoder(max_batch=4, max_seq_len=T - 1)
    with pytest.raises(ValueError, match="max_seq_len"):
        small.prefill(embeds, mask)
    with pytest.raises(ValueError, match="exceeds the decoder's max_seq_len"):
        dec.generate(embeds[:2], mask[:2], n=10)
    # Fill a sequence to the brim by hand, then one step more.
    e1, m1 = s.inputs(PROMPTS[1])
    tight = s.decoder(max_batch=1, max_seq_len=e1.shape[1] + 1)
    out = tight.step(tight.prefill(e1, m1))
    with pytest.raises(ValueError, match="no room for another step"):
        tight.step(out)
    # Still usable: a fresh batch runs and is right.
    ref = s.expected(PROMPTS[1])
    assert rel_err(tight.generate(e1, m1, 2), ref[:, :2]) < FP32_TOL
    assert rel_err(dec.generate(*s.inputs(PROMPTS[3][:2]), s.n), s.expected(PROMPTS[3][:2])) < FP32_TOL


def test_bad_step_and_prefill_input_leave_decoder_usable(emu_tokenizer):
    s = Setup("emu2", emu_tokenizer)
    embeds, mask = s.inputs(PROMPTS[3])
    dec = s.decoder()
    out = dec.prefill(embeds, mask)
    lengths = dec.lengths
    with pytest.raises(ValueError, match=r"must be \[3, 24\]"):
        dec.step(out[:2])
    with pytest.raises(TypeError, match="torch.float64"):
        dec.step(out.double())
    with pytest.raises(ValueError, match="inputs_embeds must be"):
        dec.prefill(embeds[..., :10], mask)
    with pytest.raises(TypeError, match="torch.float64"):
        dec.prefill(embeds.double(), mask)
    with pytest.raises(ValueError, match="attention_mask must be"):
        dec.prefill(embeds, mask[:, 1:])
    with pytest.raises(TypeError, match="integer or bool"):
        dec.prefill(embeds, mask.float())
    bad = mask.clone()
    bad[0] = 0
    with pytest.raises(ValueError, match="prompt 0 has no tokens"):
        dec.prefill(embeds, bad)
    bad = torch.ones_like(mask)
    bad[1, 3] = 0
    with pytest.raises(ValueError, match="not one run of ones"):
        dec.prefill(embeds, bad)
    bad = mask.clone()
    bad[0, -1] = 2
    with pytest.raises(ValueError, match="only 0 and 1"):
        dec.prefill(embeds, bad)
    assert dec.lengths == lengths  # rejected calls changed nothing
    outs = [out]
    for _ in range(s.n - 1):
        outs.append(dec.step(outs[-1]))
    assert rel_err(torch.stack(outs, 1), s.expected(PROMPTS[3])) < FP32_TOL


def test_constructor_rejects_inconsistent_weights(emu_tokenizer):
    s = Setup("emu2", emu_tokenizer)
    dec = s.decoder()
    layers = [[t for t in layer] for layer in _layers(s)]
    kw = dict(num_heads=4, num_kv_heads=4, rms_eps=1e-6, rope_theta=1e4, max_batch=2, max_seq_len=16)
    norm = s.lm.model.norm.weight.detach()
    with pytest.raises(ValueError, match="layer 1 qkv has shape"):
        bad = [list(layer) for layer in layers]
        bad[1][1] = bad[1][1][:-1]
        EmuDecoder(bad, norm, s.head, s.up, **kw)
    with pytest.raises(TypeError, match="layer 0 o is torch.bfloat16"):
        bad = [list(layer) for layer in layers]
        bad[0][2] = bad[0][2].bfloat16()
        EmuDecoder(bad, norm, s.head, s.up, **kw)
    with pytest.raises(ValueError, match="up_weight has shape"):
        EmuDecoder(layers, norm, s.head, s.up.t(), **kw)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        EmuDecoder(layers, norm, s.head, s.up, **{**kw, "num_kv_heads": 3})
    with pytest.raises(ValueError, match="max_batch and max_seq_len must be positive"):
        EmuDecoder(layers, norm, s.head, s.up, **{**kw, "max_batch": 0})
    with pytest.raises(ValueError, match="needs 6 tensors"):
        EmuDecoder([layers[0][:5]], norm, s.head, s.up, **kw)
    assert dec.num_layers == 2 and dec.hidden_size == 64 and dec.output_size == 24


def _layers(s):
    from emu_fast.dropin.packing import pack_layers
    return pack_layers(s.lm)


def test_decode_equals_step_loop_and_checks_steps(emu_tokenizer):
    s = Setup("emu2", emu_tokenizer)
    embeds, mask = s.inputs(PROMPTS[3])
    a, b = s.decoder(max_seq_len=64), s.decoder(max_seq_len=64)
    out_a, out_b = a.prefill(embeds, mask), b.prefill(embeds, mask)
    steps = [out_b]
    for _ in range(4):
        steps.append(b.step(steps[-1]))
    torch.testing.assert_close(a.decode(out_a, 4), torch.stack(steps[1:], 1), rtol=0, atol=0)
    assert a.lengths == b.lengths
    assert a.decode(out_a, 0).shape == (3, 0, 24)
    with pytest.raises(ValueError, match=r"steps must be in \[0, max_seq_len = 64\], got -1"):
        a.decode(out_a, -1)
    room = 64 - max(a.lengths)
    with pytest.raises(ValueError, match="would pass the decoder's max_seq_len of 64"):
        a.decode(out_a, room + 1)
    assert a.decode(out_a, room).shape == (3, room, 24)  # exactly to the brim still works


def test_grad_and_inference_mode_inputs(emu_tokenizer):
    """Inputs that require grad do not chain autograd history onto the cache; inference-mode
    tensors work (they carry no version counter) and give the same result."""
    s = Setup("emu2", emu_tokenizer)
    embeds, mask = s.inputs(PROMPTS[3])
    dec = s.decoder()
    expected = dec.generate(embeds, mask, s.n)
    out = dec.prefill(embeds.clone().requires_grad_(True), mask)
    assert not out.requires_grad and dec.kv_cache.grad_fn is None
    with torch.inference_mode():
        got = dec.generate(embeds, mask, s.n)
        first = dec.prefill(embeds, mask)
        second = dec.step(first)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(second, expected[:, 1], rtol=0, atol=0)


def test_concurrent_generate_is_serialized(emu_tokenizer):
    import threading

    s = Setup("emu1", emu_tokenizer)
    dec = s.decoder()
    inputs = [s.inputs(PROMPTS[3]), s.inputs(PROMPTS[1])]
    expected = [dec.generate(*i, s.n) for i in inputs]
    results, errors = {}, []

    def worker(t):
        try:
            for r in range(5):
                results[(t, r)] = dec.generate(*inputs[t % 2], s.n)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for (t, _), out in results.items():
        torch.testing.assert_close(out, expected[t % 2], rtol=0, atol=0)


def test_emu1_head_must_map_hidden_to_hidden(emu_tokenizer):
    s = Setup("emu1", emu_tokenizer)
    with pytest.raises(ValueError, match="head_weight must be \\[64, 64\\]"):
        EmuDecoder.from_llama(s.lm, torch.randn(32, 64), None, max_batch=1, max_seq_len=8)


def test_generate_checks_n_before_running(emu_tokenizer):
    s = Setup("emu1", emu_tokenizer)
    dec = s.decoder()
    with pytest.raises(ValueError, match="n must be a positive int"):
        dec.generate(*s.inputs(PROMPTS[1]), 2.5)
    assert dec.batch_size == 0  # nothing ran


def test_generate_reports_bad_prompts_with_the_cpp_checks(emu_tokenizer):
    """generate leaves the prompt checks to C++ (prompt_mask.cpp): an empty batch, a mask on
    meta or a mask value of 2 get those clear messages, not torch's reduction/item errors or a
    too-long-prompt report."""
    s = Setup("emu1", emu_tokenizer)
    embeds, mask = s.inputs(PROMPTS[3])
    dec = s.decoder()
    with pytest.raises(ValueError, match="empty batch"):
        dec.generate(embeds[:0], mask[:0], 2)
    with pytest.raises(ValueError, match="attention_mask is on meta"):
        dec.generate(embeds, mask.to("meta"), 2)
    bad = mask.clone()
    bad[0, 0] = 2
    with pytest.raises(ValueError, match=r"attention_mask holds 2 at \(0, 0\); only 0 and 1"):
        dec.generate(embeds, bad, 2)
    assert dec.batch_size == 0  # nothing ran
    assert rel_err(dec.generate(embeds, mask, 2), s.expected(PROMPTS[3])[:, :2]) < FP32_TOL


@pytest.mark.parametrize("eps", [float("inf"), float("nan"), 0.0, -1e-6])
def test_constructor_rejects_non_finite_or_non_positive_eps(emu_tokenizer, eps):
    s = Setup("emu1", emu_tokenizer)
    with pytest.raises(ValueError, match="rms_eps must be positive and finite"):
        EmuDecoder(_layers(s), s.lm.model.norm.weight.detach(), s.head, None, num_heads=4, num_kv_heads=4,
                   rms_eps=eps, rope_theta=1e4, max_batch=1, max_seq_len=8)


def test_wrong_device_inputs_are_rejected(emu_tokenizer):
    s = Setup("emu2", emu_tokenizer)
    embeds, mask = s.inputs(PROMPTS[1])
    dec = s.decoder()
    with pytest.raises(ValueError, match="inputs_embeds are on meta but the decoder is on cpu"):
        dec.prefill(embeds.to("meta"), mask)
    with pytest.raises(ValueError, match="attention_mask is on meta"):
        dec.prefill(embeds, mask.to("meta"))
    out = dec.prefill(embeds, mask)
    with pytest.raises(ValueError, match="previous output is on meta"):
        dec.step(out.to("meta"))
    assert dec.step(out).shape == out.shape


@pytest.mark.parametrize("kind", ["emu1", "emu2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_cpu_step_equals_op_by_op_step(emu_tokenizer, kind, dtype):
    """The CPU's one-parallel-region step and the op-by-op step (the path CUDA takes) run the
    same kernels with the same roundings: identical results."""
    s = Setup(kind, emu_tokenizer, kv_heads=2, dtype=dtype)
    embeds, mask = s.inputs(PROMPTS[3])
    fused, by_op = s.decoder(), s.decoder()
    by_op.fused_cpu_step = False
    assert fused.fused_cpu_step and not by_op.fused_cpu_step
    torch.testing.assert_close(fused.generate(embeds, mask, s.n), by_op.generate(embeds, mask, s.n), rtol=0, atol=0)


def test_constructor_rejects_uneven_intermediate_sizes(emu_tokenizer):
    s = Setup("emu1", emu_tokenizer)
    layers = [list(layer) for layer in _layers(s)]
    layers[1][4] = torch.randn(2 * 100, 64)  # gate_up of another width
    layers[1][5] = torch.randn(64, 100)
    with pytest.raises(ValueError, match="layer 1 has intermediate size 100 but layer 0 has 96"):
        EmuDecoder(layers, s.lm.model.norm.weight.detach(), s.head, None, num_heads=4, num_kv_heads=4,
                   rms_eps=1e-6, rope_theta=1e4, max_batch=1, max_seq_len=8)


def test_offloaded_layer_is_refused_by_name(emu_tokenizer):
    s = Setup("emu1", emu_tokenizer)
    s.lm.model.layers[1].to("meta")  # as accelerate leaves a layer it offloaded to CPU or disk
    with pytest.raises(TypeError, match=r"model\.layers\.1\.\S+ has no data"):
        EmuDecoder.from_llama(s.lm, s.head, None, max_batch=1, max_seq_len=8)


def test_layers_on_two_devices_need_segments(emu_tokenizer):
    """By hand, a decoder whose layers differ in device must be told its segments."""
    s = Setup("emu1", emu_tokenizer)
    layers = pack_layers(s.lm)
    layers[1] = [w.to("meta") for w in layers[1]]  # stands in for a second GPU
    with pytest.raises(ValueError, match=r"layer 1 input_norm is on meta but segment 0 \(from layer 0\) is on cpu"):
        EmuDecoder(layers, s.lm.model.norm.weight.detach(), s.head, None, num_heads=4, num_kv_heads=4,
                   rms_eps=1e-6, rope_theta=1e4)


def test_generate_runs_in_cpp_and_checks_capacity_before_running(emu_tokenizer):
    """generate is one C++ call (prefill + decode under the decoder's lock); called on the
    binding directly it still checks n and every prompt's room before touching the cache."""
    from emu_fast import _C

    s = Setup("emu1", emu_tokenizer)
    embeds, mask = s.inputs(PROMPTS[3])
    dec = s.decoder(max_seq_len=int(mask.sum(1).max()) + 2)
    with pytest.raises(ValueError, match="n must be positive"):
        _C.EmuDecoder.generate(dec, embeds, mask, 0)
    with pytest.raises(ValueError, match=r"plus 3 generated embeddings exceeds the decoder's max_seq_len"):
        _C.EmuDecoder.generate(dec, embeds, mask, 4)
    assert dec.batch_size == 0  # nothing ran
    out = _C.EmuDecoder.generate(dec, embeds, mask, 3)
    assert out.shape == (3, 3, 64) and out.is_contiguous()
    assert rel_err(out, s.expected(PROMPTS[3])[:, :3]) < FP32_TOL
