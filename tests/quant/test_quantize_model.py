"""Quantizing a tiny Emu1 / Emu2 model in place (emu_fast.quant.apply): its Hugging Face forward
against the same model with the dequantized weights put back, the original weights released layer
by layer, quantizing onto a device, unknown schemes and requantizing refused."""
import copy
import gc
import weakref

import pytest
import torch
from torch import nn

import emu_fast
from emu_fast.dropin.walk import LAYER_LINEARS
from emu_fast.quant import schemes
from emu_fast.quant.apply import quantize_decoder_linears_
from emu_fast.quant.modules import Int4Linear, Int8Linear, is_quantized
from emu_fast.testing import rel_err, tiny_emu
from quant_samples import hf_outputs, layer_modules


def _untouched(model):
    """The modules that must keep the model's dtype: embeddings, norms, lm_head, heads."""
    lm = model.decoder.lm
    names = ["model.embed_tokens", "model.norm", "lm_head", "stu_regress_head", "project_up", "project_down"]
    return {n: lm.get_submodule(n) for n in names if hasattr(lm, n.split(".")[0]) and _has(lm, n)}


def _has(module, name):
    try:
        module.get_submodule(name)
        return True
    except AttributeError:
        return False


def _with_dequantized_weights(quantized_model, original_copy):
    """original_copy with each decoder linear's weight set to the quantized model's dequantize()."""
    for (i, path, q), (_, _, lin) in zip(layer_modules(quantized_model), layer_modules(original_copy)):
        with torch.no_grad():
            lin.weight.copy_(q.dequantize(torch.float32).to(lin.weight.dtype))
    return original_copy


@pytest.mark.parametrize("kind", ["emu1", "emu2"])
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_model_forward_matches_dequantized_weights(kind, scheme, emu_tokenizer):
    model = tiny_emu(kind, tokenizer=emu_tokenizer, kv_heads=2, intermediate=160, hidden=96, heads=4)
    reference_model = copy.deepcopy(model)
    kept = {n: copy.deepcopy(m.state_dict()) for n, m in _untouched(model).items()}
    quantize_decoder_linears_(model, weights=scheme, group_size=32)
    cls = Int8Linear if scheme == "int8" else Int4Linear
    assert all(isinstance(m, cls) for _, _, m in layer_modules(model))
    assert len(layer_modules(model)) == 7 * len(model.decoder.lm.model.layers)
    for name, module in _untouched(model).items():  # not quantized, same weights
        assert not is_quantized(module)
        for k, v in module.state_dict().items():
            assert torch.equal(v, kept[name][k]), name
    _with_dequantized_weights(model, reference_model)

    batch = emu_tokenizer(["a photo of a cat", "a red fox sitting in tall grass at dawn"], padding="longest",
                          return_tensors="pt")
    logits, hidden = hf_outputs(model, batch.input_ids, batch.attention_mask)
    ref_logits, ref_hidden = hf_outputs(reference_model, batch.input_ids, batch.attention_mask)
    assert rel_err(hidden, ref_hidden) <= 1e-4 and rel_err(logits, ref_logits) <= 1e-4
    # the model's own generate_image (upstream's recompute loop through the HF forward)
    prompts = ["a photo of a cat", "two dogs"]
    assert rel_err(model.generate_image(prompts), reference_model.generate_image(prompts)) <= 1e-4


def test_quantized_bf16_model_runs(emu_tokenizer):
    model = tiny_emu("emu2", tokenizer=emu_tokenizer, dtype=torch.bfloat16)
    reference_model = copy.deepcopy(model)
    quantize_decoder_linears_(model, weights="int8")
    _with_dequantized_weights(model, reference_model)
    out, ref = model.generate_image(["a cat"]), reference_model.generate_image(["a cat"])
    assert out.dtype == torch.bfloat16 and rel_err(out, ref) <= 5e-2


def test_quantizing_releases_each_layers_weights_as_it_goes(monkeypatch, emu_tokenizer):
    """While layer i is quantized, the original weights of layers before it are gone: memory
    holds the quantized layers and the originals not yet reached, never both for one layer."""
    model = tiny_emu("emu1", tokenizer=emu_tokenizer, layers=3)
    refs = [(i, weakref.ref(m.weight)) for i, _, m in layer_modules(model)]
    seen = []
    real = schemes.quantize_int8

    def spy(w, **kw):
        gc.collect()
        alive = [i for i, r in refs if r() is not None]
        seen.append((len(seen), alive))
        return real(w, **kw)

    monkeypatch.setattr(schemes, "quantize_int8", spy)
    quantize_decoder_linears_(model, weights="int8")
    assert len(seen) == len(refs)
    per_layer = len(LAYER_LINEARS)
    for j, alive in seen:
        # the j-th projection being quantized: all earlier ones released, all later ones alive
        assert len(alive) == len(refs) - j, (j, alive)
        assert min(alive) == j // per_layer
    gc.collect()
    assert all(r() is None for _, r in refs)


@pytest.mark.parametrize("scheme,group", [("int8", None), ("int4", 32)])
def test_quantizing_onto_a_device_gives_the_same_buffers(scheme, group, monkeypatch, emu_tokenizer):
    """device= moves each projection's rows over in chunks; on the same device the buffers are
    bit for bit those of quantizing in place (the GPU case: test_cuda.py)."""
    model = tiny_emu("emu2", tokenizer=emu_tokenizer, layers=2, hidden=96, intermediate=300)
    twin = copy.deepcopy(model)
    kw = {"group_size": group} if group else {}
    quantize_decoder_linears_(twin, weights=scheme, **kw)
    monkeypatch.setattr(schemes, "_ROWS_PER_CHUNK", 7)  # several chunks a projection, the last short
    quantize_decoder_linears_(model, weights=scheme, device="cpu", **kw)
    for (_, _, a), (_, _, b) in zip(layer_modules(model), layer_modules(twin)):
        assert torch.equal(a.qweight, b.qweight) and torch.equal(a.scales, b.scales)


def test_quantizing_onto_a_device_moves_one_layer_at_a_time(monkeypatch, emu_tokenizer):
    """While layer i is quantized onto the target device, layers before it are there whole
    (projections and norms), later ones are where they were; the rest of the model is not moved
    (accelerate moves it). The meta device stands in for a GPU: the same code path, no values."""
    model = tiny_emu("emu1", tokenizer=emu_tokenizer, layers=3)
    layers = model.decoder.lm.model.layers
    seen = []
    real = schemes.quantize_int8

    def spy(w, device=None):
        assert device == torch.device("meta") and w.device.type == "cpu"   # from the CPU, onto the target
        seen.append([{p.device.type for p in layer.parameters()} | {b.device.type for b in layer.buffers()}
                     for layer in layers])
        return real(w, device=device)

    monkeypatch.setattr(schemes, "quantize_int8", spy)
    quantize_decoder_linears_(model, weights="int8", device="meta")
    per_layer = len(LAYER_LINEARS)
    assert len(seen) == per_layer * len(layers)
    for j, devices in enumerate(seen):
        i = j // per_layer   # the layer being quantized
        assert all(d == {"meta"} for d in devices[:i]), (j, devices)
        assert all(d == {"cpu"} for d in devices[i + 1:]), (j, devices)
    assert all({b.device.type for b in layer.buffers()} | {p.device.type for p in layer.parameters()} == {"meta"}
               for layer in layers)
    assert model.decoder.lm.model.embed_tokens.weight.device.type == "cpu"


def test_accelerate_refuses_a_device_that_is_not_there(emu_tokenizer):
    model = tiny_emu("emu1", tokenizer=emu_tokenizer)
    for device, message in [("gpu0", "is not a torch device"), (3.5, "is not a torch device")] + \
            ([] if torch.cuda.is_available() else [("cuda", "CUDA is not available")]):
        with pytest.raises(ValueError, match=message):
            emu_fast.accelerate(model, weights="int8", device=device)
        with pytest.raises(ValueError, match=message):
            quantize_decoder_linears_(model, weights="int8", device=device)
    assert all(type(m) is nn.Linear for _, _, m in layer_modules(model))    # nothing changed
    assert not hasattr(model, "emu_fast_decoder")
    # device="cpu" (where it is) quantizes and runs as without it
    twin = copy.deepcopy(model)
    out = emu_fast.accelerate(model, weights="int8", device="cpu").generate_image(["a cat"])
    torch.testing.assert_close(out, emu_fast.accelerate(twin, weights="int8").generate_image(["a cat"]),
                               rtol=0, atol=0)


def test_quantize_rejects_unknown_scheme_and_requantizing(emu_tokenizer):
    model = tiny_emu("emu2", tokenizer=emu_tokenizer)
    with pytest.raises(ValueError, match="unknown weight scheme 'int3'"):
        quantize_decoder_linears_(model, weights="int3")
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_decoder_linears_(model, weights="int4", group_size=100)
    assert all(type(m) is nn.Linear for _, _, m in layer_modules(model))    # nothing changed
    quantize_decoder_linears_(model, weights="int4", group_size=32)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_decoder_linears_(model, weights="int8")
    with pytest.raises(TypeError, match="neither"):
        quantize_decoder_linears_(nn.Linear(2, 2))
    # accelerate runs a quantized model in its own scheme, and refuses to quantize it again another way
    with pytest.raises(ValueError, match=r"already quantized as int4 \(group_size 32\); asked for int8"):
        emu_fast.accelerate(model, weights="int8")
    assert emu_fast.accelerate(model).emu_fast_decoder.weights == "int4"


def test_quantizing_an_accelerated_model_asks_for_accelerate_again(emu_tokenizer):
    model = emu_fast.accelerate(tiny_emu("emu1", tokenizer=emu_tokenizer))
    quantize_decoder_linears_(model, weights="int8")
    with pytest.raises(RuntimeError, match="call emu_fast.accelerate"):
        model.generate_image(["a cat"])
    assert model._emu_fast_original_generate_image(["a cat"]).shape == (1, 8, 64)   # upstream's loop still runs
