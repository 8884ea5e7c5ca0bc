"""The oracle itself: the reference LLaMA body matches Hugging Face's, and the reference
upstream loop equals a straightforward KV-cache-free re-implementation's results when driven
by either body. Everything else is tested against this file's functions."""
import pytest
import torch

from emu_fast import reference
from emu_fast.testing import rel_err, tiny_llama


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("pad_side", ["left", "right"])
def test_llama_body_matches_hugging_face(kv_heads, pad_side):
    lm = tiny_llama(hidden=48, layers=3, heads=4, kv_heads=kv_heads, intermediate=72, vocab=100)
    shape = reference.LlamaShape.from_hf(lm.config)
    torch.manual_seed(1)
    embeds = torch.randn(3, 7, 48)
    lens = [7, 4, 1]
    mask = torch.zeros(3, 7, dtype=torch.long)
    for b, n in enumerate(lens):
        if pad_side == "right":
            mask[b, :n] = 1
        else:
            mask[b, 7 - n:] = 1
    ours = reference.llama_body(reference.body_weights(lm), shape, embeds, mask)
    with torch.no_grad():
        theirs = lm.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    valid = mask.bool()
    assert rel_err(ours[valid], theirs[valid]) < 1e-5


def test_upstream_loop_same_with_either_body(emu_tokenizer):
    """upstream_generate_image driven by the reference body equals it driven by HF's."""
    lm = tiny_llama(hidden=32, layers=2, heads=2, intermediate=40)
    shape = reference.LlamaShape.from_hf(lm.config)
    w = reference.body_weights(lm)
    head = torch.nn.Linear(32, 32, bias=False)
    emu_tokenizer.padding_side = "right"
    kwargs = dict(embed_tokens=lm.model.embed_tokens, tokenizer=emu_tokenizer,
                  texts=["a cat", "a much longer prompt about a dog"], n=4,
                  image_placeholder="[IMG]" + "<image>" * 4 + "[/IMG]", regress=head)
    with torch.no_grad():
        a = reference.upstream_generate_image(body=lambda e, m: reference.llama_body(w, shape, e, m), **kwargs)
        b = reference.upstream_generate_image(
            body=lambda e, m: lm.model(inputs_embeds=e, attention_mask=m).last_hidden_state, **kwargs)
    assert a.shape == (2, 4, 32)
    assert rel_err(a, b) < 1e-5
