"""Emu2 as users load it from the Hugging Face hub: the hub class (`EmuForCausalLM` of the remote
code, restated as emu_fast.testing.TinyEmu2Hub with its own 4.31-era LLaMA), the Emu2-Gen
diffusers pipeline around it, and Emu2's README multi-GPU recipe (init_empty_weights +
load_checkpoint_and_dispatch). Every result is held to the model's own generate_image (the
upstream loop) on the same weights: 1e-4 per output vector in float32."""
import copy

import pytest
import torch

import emu_fast
from emu_fast.quant.io import load_quantized, save_quantized
from emu_fast.testing import TinyEmu2Hub, emu_tokenizer, rel_err, tiny_emu, tiny_emu2_hub, tiny_emu2_hub_config

from helpers import save_sharded

TEXTS = ["a photo of a cat", "an oil painting [<IMG_PLH>] of a dog riding a bicycle, at dawn", "a [<IMG_PLH>]"]


def image(count, dtype=torch.float32, seed=0):
    return torch.randn(count, 3, 8, 8, generator=torch.Generator().manual_seed(seed)).to(dtype)


def hub(**kw):
    return tiny_emu2_hub(n=16, **kw)


CASES = {
    "ragged": (TEXTS[:2], 0),
    "ragged_images": (TEXTS, 2),                                  # prompt images in two of three rows
    "image_per_row": (["[<IMG_PLH>] in oil", "a sketch of [<IMG_PLH>]"], 2),
    "negative_prompt": ([""], 0),                                 # what the pipeline computes once
    "one_image": (["draw [<IMG_PLH>] again"], 1),
}


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("case", list(CASES))
def test_hub_class_matches_its_own_generate_image(padding, case):
    texts, n_images = CASES[case]
    tok = emu_tokenizer(padding_side=padding)
    model = hub()
    img = image(n_images) if n_images else None
    expected = model.generate_image(texts, tok, img)
    assert emu_fast.family_of(model).name == "emu2-hub"
    assert emu_fast.accelerate(model) is model
    # by position, by keyword, and as the pipeline calls it
    for out in (model.generate_image(texts, tok, img), model.generate_image(texts, tok, image=img),
                model.generate_image(text=texts, image=img, tokenizer=tok)):
        assert out.shape == expected.shape == (len(texts), 16, 40) and out.dtype == expected.dtype
        assert rel_err(out, expected) < 1e-4
    assert tok.padding_side == padding  # the tokenizer given is used as it is


def test_hub_class_bfloat16():
    tok = emu_tokenizer(padding_side="left")
    model = hub(dtype=torch.bfloat16)
    truth = copy.deepcopy(model).float().generate_image(TEXTS, tok, image(2))
    expected = model.generate_image(TEXTS, tok, image(2, torch.bfloat16))
    emu_fast.accelerate(model)
    out = model.generate_image(TEXTS, tok, image(2, torch.bfloat16))
    assert out.dtype == torch.bfloat16
    # as for the native classes (test_accelerate.py): our error against float32 is at most twice
    # the model's own bfloat16 loop's
    assert rel_err(out, truth) <= 2 * rel_err(expected, truth)


def test_hub_class_runs_the_remote_codes_rotary_modules():
    """The remote LLaMA keeps a rotary module per layer, called as rotary_emb(x, seq_len=...), with
    cached tables; emu_fast asks one of them (a copy: the model's buffers stay as they were)."""
    model = hub()
    rotary = model.model.decoder.lm.model.layers[0].self_attn.rotary_emb
    cached = rotary.cos_cached.clone()
    emu_fast.accelerate(model, max_seq_len=None)
    long_text = ["word " * 2100]  # past the 2048 positions its modules cache: their copy grows, they do not
    model.generate_image(long_text, emu_tokenizer(padding_side="left"))
    assert torch.equal(rotary.cos_cached, cached)


# ------------------------------------------------------------------------------ the pipeline

class _Emu2GenCalls:
    """What pipeline_emu2_gen.py does with its multimodal_encoder (the UNet, VAE and scheduler left
    out: the result is the UNet's conditioning): the prompt through generate_image with the
    pipeline's tokenizer, the negative prompt once (cached), both concatenated for classifier-free
    guidance and averaged over the n embeddings; image-only prompts skip the language model."""

    @torch.no_grad()
    def __call__(self, inputs):
        prompt, images = "", []
        for x in inputs:
            if isinstance(x, str):
                prompt += x
            else:
                prompt += "[<IMG_PLH>]"
                images.append(x)
        images = torch.stack(images) if images else None
        encoder = self.multimodal_encoder
        if prompt.replace("[<IMG_PLH>]", ""):
            embeds = encoder.generate_image(text=[prompt], image=images, tokenizer=self.tokenizer)
        else:
            embeds = encoder.project_up(encoder.model.encode_image(images)).new_zeros(1, 16, 40)
        if "negative_prompt" not in self.negative_prompt:
            self.negative_prompt["negative_prompt"] = encoder.generate_image(text=[""], tokenizer=self.tokenizer)
        return torch.cat([self.negative_prompt["negative_prompt"], embeds]).mean(dim=1)


def _pipeline_class(kind):
    """The stand-in as a diffusers DiffusionPipeline (its modules registered as the real one's),
    or as a plain object (diffusers cannot be imported beside transformers 4.31's huggingface_hub)."""
    if kind == "plain":
        class PlainPipeline(_Emu2GenCalls):
            def __init__(self, multimodal_encoder, tokenizer):
                self.multimodal_encoder, self.tokenizer, self.negative_prompt = multimodal_encoder, tokenizer, {}
        return PlainPipeline
    diffusers = pytest.importorskip("diffusers", exc_type=ImportError)

    class TinyEmu2GenPipeline(_Emu2GenCalls, diffusers.DiffusionPipeline):
        def __init__(self, multimodal_encoder, tokenizer):
            super().__init__()
            self.register_modules(multimodal_encoder=multimodal_encoder, tokenizer=tokenizer)
            self.negative_prompt = {}

        __call__ = _Emu2GenCalls.__call__
    return TinyEmu2GenPipeline


@pytest.mark.parametrize("kind", ["diffusers", "plain"])
def test_accelerating_the_pipeline_accelerates_its_encoder(kind):
    cls = _pipeline_class(kind)

    def pipeline():
        return cls(hub(), emu_tokenizer(padding_side="left"))

    prompts = [["a cat wearing a hat"], ["a drawing of ", image(1)[0], " at night"]]
    plain = pipeline()
    expected = [plain(p) for p in prompts]
    pipe = pipeline()
    assert emu_fast.accelerate(pipe) is pipe
    assert hasattr(pipe.multimodal_encoder, "emu_fast_decoder")
    for p, e in zip(prompts, expected):
        out = pipe(p)
        assert out.shape == e.shape == (2, 40)
        assert rel_err(out, e) < 1e-4


def test_a_pipeline_without_an_emu_encoder_is_refused():
    class NotEmu:
        multimodal_encoder = torch.nn.Linear(2, 2)

    with pytest.raises(TypeError, match="Linear is not an Emu model emu_fast knows"):
        emu_fast.accelerate(NotEmu())


# ------------------------------------------------------------------------------ Emu2's README recipe

@pytest.mark.parametrize("weights", [None, "int8"])
def test_readme_multi_gpu_recipe_then_accelerate(tmp_path, weights):
    accelerate = pytest.importorskip("accelerate")
    source = hub(seed=3)
    save_sharded(source.state_dict(), tmp_path, 2)
    tok = emu_tokenizer(padding_side="left")
    expected = source.generate_image(TEXTS, tok, image(2))

    # Emu2's README, on one CPU: build empty, place whole layers, load the shards with hooks.
    with accelerate.init_empty_weights():
        model = TinyEmu2Hub(tiny_emu2_hub_config(n=16))
    assert model.project_up.weight.is_meta
    device_map = accelerate.infer_auto_device_map(model, max_memory={"cpu": "1GiB"},
                                                  no_split_module_classes=["Block", "LlamaDecoderLayer"])
    model = accelerate.load_checkpoint_and_dispatch(model, str(tmp_path), device_map=device_map,
                                                    force_hooks=True).eval()
    assert any(hasattr(m, "_hf_hook") for m in model.modules())
    assert rel_err(model.generate_image(TEXTS, tok, image(2)), expected) < 1e-5  # the load itself

    emu_fast.accelerate(model, weights=weights)
    out = model.generate_image(TEXTS, tok, image(2))
    if weights is None:
        assert rel_err(out, expected) < 1e-4
    else:  # the model's own forward runs on the same quantized weights
        assert rel_err(out, model._emu_fast_original_generate_image(TEXTS, tok, image(2))) < 1e-4


# ------------------------------------------------------------------------------ every option

@pytest.mark.parametrize("options", [
    {"weights": "int8"},
    {"weights": "int4", "group_size": 32},
    {"kernels": "aten"},
    {"kernels": "custom", "max_batch": 3, "max_seq_len": 256},
    {"device": "cpu", "weights": "int4", "group_size": 64},
], ids=["int8", "int4", "aten", "limits", "device"])
def test_hub_class_takes_every_option(options):
    tok = emu_tokenizer(padding_side="left")
    model = hub(hidden=128, intermediate=192)
    emu_fast.accelerate(model, **options)
    # against the model's own loop on the weights it now holds (quantized in place when asked)
    expected = model._emu_fast_original_generate_image(TEXTS, tok, image(2))
    assert rel_err(model.generate_image(TEXTS, tok, image(2)), expected) < 1e-4
    decoder = model.emu_fast_decoder
    assert decoder.weights == options.get("weights")
    if "max_batch" in options:
        with pytest.raises(ValueError, match="4 prompts exceed the decoder's max_batch of 3"):
            model.generate_image(TEXTS + ["one more"], tok)


def test_hub_class_split_over_segments():
    tok = emu_tokenizer(padding_side="left")
    model = hub(layers=3)
    expected = model.generate_image(TEXTS, tok, image(2))
    lm = model.model.decoder.lm
    decoder = emu_fast.EmuDecoder.from_llama(lm, model.project_down.weight, model.project_up.weight,
                                             split_before=[1, 2])
    assert len(decoder.segments) == 3
    emu_fast.accelerate(model)
    model.emu_fast_decoder = decoder
    assert rel_err(model.generate_image(TEXTS, tok, image(2)), expected) < 1e-4


def test_hub_class_quantized_save_and_load(tmp_path):
    tok = emu_tokenizer(padding_side="left")
    model = hub(hidden=128, intermediate=192)
    emu_fast.quant.apply.quantize_decoder_linears_(model, weights="int4", group_size=64)
    expected = model.generate_image(TEXTS, tok, image(2))
    save_quantized(model, tmp_path / "hub-int4.safetensors")
    fresh = hub(hidden=128, intermediate=192, seed=0)  # the same project_up/down and vision parts
    load_quantized(fresh, tmp_path / "hub-int4.safetensors")
    emu_fast.accelerate(fresh)
    assert fresh.emu_fast_decoder.weights == "int4"
    assert rel_err(fresh.generate_image(TEXTS, tok, image(2)), expected) < 1e-4


# ------------------------------------------------------------------------------ bad input

def test_bad_calls_raise_and_the_model_stays_usable():
    tok = emu_tokenizer(padding_side="left")
    model = hub()
    expected = model.generate_image(TEXTS[:2], tok)
    emu_fast.accelerate(model)
    plain_llama = emu_tokenizer(padding_side="left")
    plain_llama = type(plain_llama).from_pretrained(emu_fast.testing.TOKENIZER_DIR)  # no Emu tokens
    with pytest.raises(ValueError, match=r"tokenizer lacks Emu's \[IMG\], \[/IMG\], <image> token"):
        model.generate_image(TEXTS[:2], plain_llama)
    with pytest.raises(TypeError, match=r"missing a required argument: 'tokenizer'"):
        model.generate_image(TEXTS[:2])
    with pytest.raises(TypeError, match="needs the tokenizer as an argument"):
        model.generate_image(TEXTS[:2], None)
    with pytest.raises(ValueError, match="the prompts have 16 <image> slots but the prompt images give 32"):
        model.generate_image(["one [<IMG_PLH>]"], tok, image(2))
    with pytest.raises(TypeError, match="list of prompt strings"):
        model.generate_image("a cat", tok)
    with pytest.raises(TypeError, match="prompt images must be a tensor"):
        model.generate_image(TEXTS[:1], tok, "cat.png")
    assert rel_err(model.generate_image(TEXTS[:2], tok), expected) < 1e-4


def test_hub_model_without_project_up_is_refused_unchanged():
    model = hub()
    del model.project_up
    with pytest.raises(TypeError, match="as emu2-hub it lacks project_up"):
        emu_fast.accelerate(model)
    assert not hasattr(model, "emu_fast_decoder") and "generate_image" not in vars(model)


def test_native_classes_take_no_tokenizer():
    model = tiny_emu("emu2", n=16)
    expected = model.generate_image(TEXTS[:2])
    emu_fast.accelerate(model)
    with pytest.raises(TypeError, match=r"TinyEmu2 \(emu2\) has its own tokenizer \(model.decoder.tokenizer\)"):
        model.generate_image(TEXTS[:2], tokenizer=model.decoder.tokenizer)
    with pytest.raises(TypeError, match="prompt images must be a tensor"):  # a tokenizer where image goes
        model.generate_image(TEXTS[:2], model.decoder.tokenizer)
    assert rel_err(model.generate_image(TEXTS[:2]), expected) < 1e-4


def test_native_model_whose_tokenizer_lacks_emu_tokens_is_refused_at_accelerate():
    model = tiny_emu("emu1", n=8)
    tok = model.decoder.tokenizer
    model.decoder.tokenizer = type(tok).from_pretrained(emu_fast.testing.TOKENIZER_DIR)
    with pytest.raises(ValueError, match=r"lacks Emu's \[IMG\], \[/IMG\], <image> token"):
        emu_fast.accelerate(model)
    assert not hasattr(model, "emu_fast_decoder")
