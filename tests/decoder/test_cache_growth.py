"""Memory sized to the request: the KV cache starts empty and grows to the
largest batch x length requested (lengths rounded up to a multiple of 128), the RoPE tables
with it; growth mid-sequence carries the cached keys/values over so the sequence continues
bitwise; max_batch / max_seq_len are optional limits; memory_summary() adds up."""
import pytest
import torch

import emu_fast
from emu_fast import EmuDecoder
from emu_fast.testing import rel_err, tiny_emu

from decoder_setup import LOOP_TOL, PROMPTS, Setup

FP32_TOL = LOOP_TOL[torch.float32]
LONG = ["a photo of a cat sitting on a red chair " * 150]  # about 1500 tokens


def kv_bytes(dec):
    return dec.kv_cache.numel() * dec.kv_cache.element_size()


def test_cache_starts_empty_and_grows_to_the_requests(emu_tokenizer):
    s = Setup("emu2", emu_tokenizer)
    dec = EmuDecoder.from_llama(s.lm, s.head, s.up)  # no capacity arguments
    assert dec.max_batch is None and dec.max_seq_len is None
    assert dec.capacity == (0, 0) and kv_bytes(dec) == 0
    L, Hkv, D = dec.num_layers, dec.num_kv_heads, dec.head_dim

    # A short prompt: a cache for one row of 128 positions (the length rounded up), no more.
    embeds, mask = s.inputs(PROMPTS[1])
    assert embeds.shape[1] + s.n - 1 <= 128
    out = dec.generate(embeds, mask, s.n)
    assert rel_err(out, s.expected(PROMPTS[1])) < FP32_TOL
    assert dec.capacity == (1, 128)
    assert dec.kv_cache.shape == (L, 2, 1, Hkv, 128, D)
    assert kv_bytes(dec) == L * 2 * 1 * Hkv * 128 * D * 4

    # A long prompt after the short one: the cache and the RoPE tables grow, the result is right.
    embeds, mask = s.inputs(LONG)
    T = embeds.shape[1]
    assert T > 1400
    out = dec.generate(embeds, mask, s.n)
    assert rel_err(out, s.expected(LONG)) < FP32_TOL
    need = T + s.n - 1
    assert dec.capacity == (1, (need + 127) // 128 * 128)
    assert dec.rope_positions >= T + s.n - 1

    # A short one again: no reallocation.
    ptr = dec.kv_cache.data_ptr()
    assert rel_err(dec.generate(*s.inputs(PROMPTS[1]), s.n), s.expected(PROMPTS[1])) < FP32_TOL
    assert dec.kv_cache.data_ptr() == ptr

    # A larger batch: the batch grows to the request's, the length capacity stays.
    seq = dec.capacity[1]
    out = dec.generate(*s.inputs(PROMPTS[3]), s.n)
    assert rel_err(out, s.expected(PROMPTS[3])) < FP32_TOL
    assert dec.capacity == (3, seq)
    assert dec.kv_cache.shape == (L, 2, 3, Hkv, seq, D)


@pytest.mark.parametrize("kind", ["emu1", "emu2"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "op_by_op"])
def test_growth_mid_sequence_continues_exactly(emu_tokenizer, kind, fused):
    """Prefill a short batch, then step and decode past the cache's capacity: the cache grows
    with the cached keys/values copied, and every output is bitwise what a decoder that was big
    enough from the start gives."""
    s = Setup(kind, emu_tokenizer)
    embeds, mask = s.inputs(PROMPTS[3])
    grown, big = s.decoder(max_batch=None, max_seq_len=None), s.decoder(max_batch=None, max_seq_len=None)
    big.reserve(3, 512)
    assert big.capacity == (3, 512)
    for d in (grown, big):
        d.fused_cpu_step = fused
    a, b = grown.prefill(embeds, mask), big.prefill(embeds, mask)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert grown.capacity == (3, 128)
    outs_a, outs_b = [a], [b]
    # Steps one at a time up to and past the 128-position capacity...
    while max(grown.lengths) < 130:
        outs_a.append(grown.step(outs_a[-1]))
        outs_b.append(big.step(outs_b[-1]))
    assert grown.capacity == (3, 256)
    # ...then a decode that grows it again.
    rest_a, rest_b = grown.decode(outs_a[-1], 200), big.decode(outs_b[-1], 200)
    assert grown.capacity == (3, 384) and grown.lengths == big.lengths
    torch.testing.assert_close(torch.stack(outs_a, 1), torch.stack(outs_b, 1), rtol=0, atol=0)
    torch.testing.assert_close(rest_a, rest_b, rtol=0, atol=0)
    # The first n outputs are still the upstream loop's.
    assert rel_err(torch.stack(outs_a, 1)[:, :s.n], s.expected(PROMPTS[3])) < FP32_TOL


def test_reserve_keeps_the_active_batch(emu_tokenizer):
    s = Setup("emu2", emu_tokenizer)
    embeds, mask = s.inputs(PROMPTS[3])
    grown, fresh = s.decoder(max_batch=None, max_seq_len=None), s.decoder(max_batch=None, max_seq_len=None)
    a, b = grown.prefill(embeds, mask), fresh.prefill(embeds, mask)
    grown.reserve(5, 300)  # mid-sequence, more rows and positions
    assert grown.capacity == (5, 384) and grown.batch_size == 3
    torch.testing.assert_close(grown.decode(a, 4), fresh.decode(b, 4), rtol=0, atol=0)


def test_limits_are_respected_and_the_decoder_stays_usable(emu_tokenizer):
    s = Setup("emu1", emu_tokenizer)
    dec = s.decoder(max_batch=2, max_seq_len=64)
    assert (dec.max_batch, dec.max_seq_len) == (2, 64)
    embeds, mask = s.inputs(PROMPTS[3])
    with pytest.raises(ValueError, match="batch of 3 prompts exceeds the decoder's max_batch of 2"):
        dec.generate(embeds, mask, s.n)
    with pytest.raises(ValueError, match="max_seq_len of 64"):
        dec.generate(*s.inputs(LONG), s.n)
    with pytest.raises(ValueError, match="exceeds the decoder's max_batch of 2"):
        dec.reserve(3, 8)
    with pytest.raises(ValueError, match="exceed the decoder's max_seq_len of 64"):
        dec.reserve(1, 65)
    assert dec.capacity == (0, 0)  # nothing was allocated for refused requests
    out = dec.generate(*s.inputs(PROMPTS[3][:2]), s.n)
    assert rel_err(out, s.expected(PROMPTS[3][:2])) < FP32_TOL
    assert dec.capacity == (2, 64)  # rounded up to 128, capped at the limit
    e1, m1 = s.inputs(PROMPTS[1])
    out = dec.prefill(e1, m1)
    with pytest.raises(ValueError, match="would pass the decoder's max_seq_len of 64"):
        dec.decode(out, 64)
    assert dec.capacity == (2, 64)
    assert rel_err(dec.generate(e1, m1, s.n), s.expected(PROMPTS[1])) < FP32_TOL
    with pytest.raises(ValueError, match="max_batch must be a positive int or None"):
        EmuDecoder.from_llama(s.lm, s.head, None, max_batch=0)


def test_fixed_rope_tables_say_when_they_are_too_short(emu_tokenizer):
    from emu_fast.dropin import packing
    from emu_fast.rope import theta_rope_tables

    s = Setup("emu1", emu_tokenizer)
    cos, sin = theta_rope_tables(16, 8, 1e4)
    dec = EmuDecoder(packing.pack_layers(s.lm), s.lm.model.norm.weight.detach(), s.head, None, num_heads=4,
                     num_kv_heads=4, rms_eps=1e-6, rope_cos=cos, rope_sin=sin)
    embeds, mask = s.inputs(PROMPTS[1])
    with pytest.raises(ValueError, match=r"needs RoPE tables for \d+ positions but the decoder was given 8"):
        dec.generate(embeds, mask, s.n)
    # By hand with rope_theta (the default), the tables grow as needed.
    dec = EmuDecoder(packing.pack_layers(s.lm), s.lm.model.norm.weight.detach(), s.head, None, num_heads=4,
                     num_kv_heads=4, rms_eps=s.lm.config.rms_norm_eps, rope_theta=s.lm.config.rope_theta
                     if hasattr(s.lm.config, "rope_theta") else 1e4)
    assert dec.generate(embeds, mask, s.n).shape == (1, s.n, 64)
    assert dec.rope_positions >= embeds.shape[1] + s.n - 1


def test_memory_summary_adds_up(emu_tokenizer):
    s = Setup("emu2", emu_tokenizer)
    dec = s.decoder(max_batch=None, max_seq_len=None)
    body = s.lm.model
    weights = sum(p.numel() * p.element_size() for p in body.parameters() if p is not body.embed_tokens.weight)
    weights += sum(t.numel() * t.element_size() for t in (s.head, s.up))
    m = dec.memory_summary()
    assert m == {"weights": weights, "kv_cache": 0, "scratch": 0, "batch": 0, "seq_len": 0,
                 "kv_cache_per_device": {"cpu": 0}}
    dec.generate(*s.inputs(PROMPTS[3]), s.n)
    m = dec.memory_summary()
    assert m["weights"] == weights
    assert m["kv_cache"] == dec.kv_cache.numel() * dec.kv_cache.element_size() > 0
    assert (m["batch"], m["seq_len"]) == dec.capacity == (3, 128)
    rope = 2 * dec.rope_positions * (dec.head_dim // 2) * 4
    # RoPE tables + per-row lengths and starts (int64) + attention's split counters (int32, a row and KV head)
    assert m["scratch"] == rope + 2 * 3 * 8 + 3 * dec.num_kv_heads * 4


def test_accelerate_without_capacity_arguments(emu_tokenizer):
    model = tiny_emu("emu2", tokenizer=emu_tokenizer, n=8)
    texts = ["a photo of a cat", "a red fox in tall grass at dawn", "hi"]
    expected_short, expected_batch = model.generate_image(texts[:1]), model.generate_image(texts)
    expected_long = model.generate_image(LONG)
    emu_fast.accelerate(model)
    dec = model.emu_fast_decoder
    assert dec.capacity == (0, 0) and dec.max_batch is None and dec.max_seq_len is None
    assert rel_err(model.generate_image(texts[:1]), expected_short) < FP32_TOL
    assert dec.capacity == (1, 128)
    assert rel_err(model.generate_image(LONG), expected_long) < FP32_TOL
    assert rel_err(model.generate_image(texts), expected_batch) < FP32_TOL
    assert dec.capacity[0] == 3 and dec.capacity[1] > 1400
    # Limits on accelerate: clear errors, the model stays usable.
    emu_fast.accelerate(model, max_batch=2, max_seq_len=128)
    with pytest.raises(ValueError, match="3 prompts exceed the decoder's max_batch of 2"):
        model.generate_image(texts)
    with pytest.raises(ValueError, match="max_seq_len of 128"):
        model.generate_image(LONG)
    assert rel_err(model.generate_image(texts[:1]), expected_short) < FP32_TOL


def test_decoder_keeps_no_model_alive(emu_tokenizer):
    """The decoder extends its RoPE tables from a copy of the rotary module, not the model: a
    model dropped after from_llama is freed, and the decoder still grows its tables."""
    import gc
    import weakref

    s = Setup("emu2", emu_tokenizer)
    embeds, mask = s.inputs(LONG)
    expected = s.expected(PROMPTS[1])
    short = s.inputs(PROMPTS[1])
    dec = EmuDecoder.from_llama(s.lm, s.head, s.up)
    alive = weakref.ref(s.lm)
    del s
    gc.collect()
    assert alive() is None
    assert dec.generate(embeds, mask, 2).shape[1] == 2 and dec.rope_positions > embeds.shape[1]
    assert rel_err(dec.generate(*short, expected.shape[1]), expected) < FP32_TOL


def test_large_reserve_builds_rope_tables_for_what_is_needed(emu_tokenizer):
    """reserve(1, 2**16 + 1): the RoPE tables cover the reserved positions (rounded up to 128
    like the cache), not twice the cache's capacity (reserve(1, 2**22) on this hidden-64 model
    built tables for 2**23 positions, with several times that in temporaries: 3.2 GB). Growing
    past them later at most doubles them. Measured on memory_summary's scratch bytes."""
    s = Setup("emu2", emu_tokenizer)
    dec = s.decoder(max_batch=None, max_seq_len=None)
    need = 2 ** 16 + 1
    dec.reserve(1, need)
    P = (need + 127) // 128 * 128
    assert dec.capacity == (1, P) and dec.rope_positions == P
    per_position = 2 * (dec.head_dim // 2) * 4  # cos and sin, float32
    lengths = 2 * 1 * 8 + 1 * dec.num_kv_heads * 4
    assert dec.memory_summary()["scratch"] == P * per_position + lengths
    # a request past the tables: they grow to twice their length, no more
    dec.reserve(1, P + 1)
    assert dec.rope_positions == 2 * P
    assert dec.memory_summary()["scratch"] == 2 * P * per_position + lengths


def test_limits_and_reserve_sizes_past_int64_are_refused_naming_them(emu_tokenizer):
    """Sizes of 2**63 and more do not fit the decoder's int64: a ValueError naming the argument,
    not pybind's signature dump (TypeError), from EmuDecoder, from_llama and reserve."""
    from emu_fast.dropin import packing

    s = Setup("emu2", emu_tokenizer)
    for name in ("max_batch", "max_seq_len"):
        with pytest.raises(ValueError, match=rf"{name} must be at most 2\*\*63 - 1 .*got 9223372036854775808"):
            EmuDecoder.from_llama(s.lm, s.head, s.up, **{name: 2 ** 63})
        with pytest.raises(ValueError, match=rf"{name} must be at most 2\*\*63 - 1"):
            EmuDecoder(packing.pack_layers(s.lm), s.lm.model.norm.weight.detach(), s.head, s.up, num_heads=4,
                       num_kv_heads=4, rms_eps=s.lm.config.rms_norm_eps, **{name: 2 ** 64})
    dec = EmuDecoder.from_llama(s.lm, s.head, s.up, max_batch=2 ** 62, max_seq_len=2 ** 63 - 1)  # the largest: no limit
    assert (dec.max_batch, dec.max_seq_len) == (2 ** 62, None)
    for args, name in [((2 ** 63, 1), "batch"), ((1, 2 ** 63), "seq_len"), ((1, 2 ** 70), "seq_len"),
                       ((-1, 1), "batch"), ((1, 1.5), "seq_len"), ((True, 1), "batch")]:
        with pytest.raises(ValueError, match=rf"EmuDecoder.reserve: {name} must be an int in \[0, 2\*\*63 - 1\]"):
            dec.reserve(*args)
    assert dec.capacity == (0, 0)
    assert rel_err(dec.generate(*s.inputs(PROMPTS[1]), s.n), s.expected(PROMPTS[1])) < FP32_TOL
