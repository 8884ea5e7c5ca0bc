"""The portable ATen step (kernels="aten") against the reference upstream recompute loop for every
case the custom path has: Emu1 (right padding) and Emu2 (left padding), prompt images, ragged
batches, MHA and GQA, float32 and bfloat16; the step/decode API and cache growth on it; aten vs
custom decoders; accelerate(model, kernels="aten"); the kernels argument's checks."""
import pytest
import torch

import emu_fast
from emu_fast import EmuDecoder
from emu_fast.testing import rel_err, tiny_emu

from decoder_setup import LOOP_TOL, PROMPTS, Setup

FP32_TOL = LOOP_TOL[torch.float32]
LONG = ["a photo of a cat sitting on a red chair " * 40]  # about 400 tokens: past one 128-row block
# (texts, with prompt images): a ragged batch with a prompt image in one row; batch 1, text only.
CASES = {"ragged_images": (PROMPTS[3], True), "single_text": (PROMPTS[1], False),
         "two_images": (["look [<IMG_PLH>] and [<IMG_PLH>] then draw"], True)}


def _images(s, texts, seed=5):
    count = sum(t.count("[<IMG_PLH>]") for t in texts) * s.n
    return torch.randn(count, s.lm.config.hidden_size, generator=torch.Generator().manual_seed(seed))


def _case(s, name):
    texts, with_images = CASES[name]
    return texts, _images(s, texts) if with_images else None


@pytest.mark.parametrize("kind", ["emu1", "emu2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("case", list(CASES))
def test_aten_step_matches_upstream_loop(emu_tokenizer, kind, dtype, kv_heads, case):
    s = Setup(kind, emu_tokenizer, kv_heads=kv_heads, dtype=dtype)
    texts, images = _case(s, case)
    dec = s.decoder(kernels="aten")
    assert dec.kernels == "aten" and dec.kernel_mode == "aten"
    out = dec.generate(*s.inputs(texts, images), s.n)
    expected = s.expected(texts, images)
    assert out.dtype == dtype
    assert out.shape == expected.shape == (len(texts), s.n, s.head.shape[0])
    assert rel_err(out, expected) < LOOP_TOL[dtype]
    assert dec.fallback_reason == ""


@pytest.mark.parametrize("kind", ["emu1", "emu2"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_aten_and_custom_decoders_agree(emu_tokenizer, kind, dtype, tol):
    s = Setup(kind, emu_tokenizer, kv_heads=2, dtype=dtype)
    texts, images = _case(s, "ragged_images")
    inputs = s.inputs(texts, images)
    aten, custom = s.decoder(kernels="aten"), s.decoder(kernels="custom")
    assert (aten.kernels, custom.kernels) == ("aten", "custom")
    a, c = aten.generate(*inputs, s.n), custom.generate(*inputs, s.n)
    assert a.shape == c.shape and a.dtype == c.dtype == dtype
    assert rel_err(a, c) < tol


@pytest.mark.parametrize("kind", ["emu1", "emu2"])
def test_accelerate_with_aten_kernels_matches_original(emu_tokenizer, kind):
    model = tiny_emu(kind, tokenizer=emu_tokenizer, kv_heads=2)
    texts = ["a photo of a cat", "an oil painting [<IMG_PLH>] of a dog riding a bicycle, at dawn", "a [<IMG_PLH>]"]
    image = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    expected, expected_text = model.generate_image(texts, image), model.generate_image(texts[:1])
    assert emu_fast.accelerate(model, kernels="aten") is model
    assert model.emu_fast_decoder.kernels == "aten"
    out = model.generate_image(texts, image)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    assert rel_err(out, expected) < 1e-4
    assert rel_err(model.generate_image(texts[:1]), expected_text) < 1e-4


@pytest.mark.parametrize("kind", ["emu1", "emu2"])
def test_aten_prefill_step_decode_equal_generate(emu_tokenizer, kind):
    s = Setup(kind, emu_tokenizer, kv_heads=2)
    embeds, mask = s.inputs(PROMPTS[3])
    dec = s.decoder(kernels="aten")
    whole = dec.generate(embeds, mask, s.n)
    first = dec.prefill(embeds, mask)
    assert dec.lengths == mask.sum(1).tolist()
    second = dec.step(first)
    rest = dec.decode(second, s.n - 2)
    assert dec.lengths == (mask.sum(1) + s.n - 1).tolist()
    by_hand = torch.cat([first[:, None], second[:, None], rest], 1)
    torch.testing.assert_close(by_hand, whole, rtol=0, atol=0)
    assert rel_err(by_hand, s.expected(PROMPTS[3])) < FP32_TOL


def test_aten_cache_growth_matches_upstream_loop(emu_tokenizer):
    s = Setup("emu2", emu_tokenizer)
    dec = EmuDecoder.from_llama(s.lm, s.head, s.up, kernels="aten")
    assert dec.capacity == (0, 0)
    assert rel_err(dec.generate(*s.inputs(PROMPTS[1]), s.n), s.expected(PROMPTS[1])) < FP32_TOL
    assert dec.capacity == (1, 128)
    embeds, mask = s.inputs(LONG)  # a long prompt after the short one: the cache and RoPE grow
    assert embeds.shape[1] + s.n - 1 > 128
    assert rel_err(dec.generate(embeds, mask, s.n), s.expected(LONG)) < FP32_TOL
    seq = dec.capacity[1]
    assert seq >= embeds.shape[1] + s.n - 1 and dec.rope_positions >= embeds.shape[1] + s.n - 1
    # A larger batch: the batch grows, the length capacity stays.
    assert rel_err(dec.generate(*s.inputs(PROMPTS[3]), s.n), s.expected(PROMPTS[3])) < FP32_TOL
    assert dec.capacity == (3, seq)


def test_float16_runs_on_aten_but_not_custom_on_the_cpu(emu_tokenizer):
    s = Setup("emu1", emu_tokenizer, kv_heads=2, dtype=torch.float16)
    with pytest.raises(ValueError, match=r'kernels="custom" cannot run here'):
        s.decoder(kernels="custom")
    dec = s.decoder(kernels="aten")
    out = dec.generate(*s.inputs(PROMPTS[3]), s.n)
    assert out.dtype == torch.float16
    assert rel_err(out, s.expected(PROMPTS[3])) < LOOP_TOL[torch.float16]


def test_unknown_kernels_are_refused(emu_tokenizer):
    s = Setup("emu2", emu_tokenizer)
    allowed = r"kernels must be one of \('auto', 'custom', 'aten'\), got 'bogus'"
    with pytest.raises(ValueError, match=allowed):
        s.decoder(kernels="bogus")
    with pytest.raises(ValueError, match=allowed):
        emu_fast.accelerate(tiny_emu("emu2", tokenizer=emu_tokenizer), kernels="bogus")
