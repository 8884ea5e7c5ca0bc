"""Saving and loading a quantized model (emu_fast.quant.io): the same outputs after a round trip,
loading into a model built on the meta device, bad files and damaged metadata refused."""
import copy

import pytest
import torch
from torch import nn

from emu_fast.quant.apply import quantize_decoder_linears_
from emu_fast.quant.io import load_quantized, quantized_state_dict, save_quantized
from emu_fast.quant.modules import is_quantized
from emu_fast.testing import tiny_emu
from quant_samples import hf_outputs, layer_modules


@pytest.mark.parametrize("kind,scheme", [("emu1", "int8"), ("emu2", "int4")])
def test_save_load_same_output(kind, scheme, tmp_path, emu_tokenizer):
    model = quantize_decoder_linears_(tiny_emu(kind, tokenizer=emu_tokenizer), weights=scheme, group_size=32)
    path = tmp_path / "q.safetensors"
    save_quantized(model, path)
    fresh = tiny_emu(kind, tokenizer=emu_tokenizer, seed=7)     # other random weights, same config
    assert load_quantized(fresh, path) is fresh
    assert all(is_quantized(m) for _, _, m in layer_modules(fresh))
    batch = emu_tokenizer(["a photo of a cat", "a fox"], padding="longest", return_tensors="pt")
    for a, b in zip(hf_outputs(model, batch.input_ids, batch.attention_mask),
                    hf_outputs(fresh, batch.input_ids, batch.attention_mask)):
        assert torch.equal(a, b)
    assert torch.equal(model.generate_image(["a cat"]), fresh.generate_image(["a cat"]))
    # into a model already quantized the same way; and from a QuantizedState
    save_quantized(quantized_state_dict(model), tmp_path / "again.safetensors")
    assert load_quantized(fresh, tmp_path / "again.safetensors") is fresh
    assert torch.equal(model.generate_image(["a dog"]), fresh.generate_image(["a dog"]))


def test_load_into_meta_model(tmp_path, emu_tokenizer):
    model = quantize_decoder_linears_(tiny_emu("emu2", tokenizer=emu_tokenizer), weights="int8")
    save_quantized(model, tmp_path / "q.safetensors")
    # buffers too (RoPE's inv_freq, and transformers 4.31's cos/sin caches, are in no file): refused,
    # naming them
    with torch.device("meta"):
        with pytest.raises(ValueError, match=r"buffers \[.*(inv_freq|cos_cached).*\] are on the meta device"):
            load_quantized(tiny_emu("emu2", tokenizer=emu_tokenizer), tmp_path / "q.safetensors")
    from accelerate import init_empty_weights

    with init_empty_weights():  # parameters on the meta device, buffers real
        skeleton = tiny_emu("emu2", tokenizer=emu_tokenizer)
    assert skeleton.decoder.lm.lm_head.weight.is_meta
    load_quantized(skeleton, tmp_path / "q.safetensors")
    assert all(not t.is_meta for t in skeleton.decoder.lm.state_dict().values())
    assert torch.equal(model.decoder.lm.lm_head.weight, skeleton.decoder.lm.lm_head.weight)
    ids = torch.tensor([[1, 450, 6635, 29889]])
    assert torch.equal(hf_outputs(model, ids, None)[1], hf_outputs(skeleton, ids, None)[1])


def _unchanged(model, before):
    assert all(type(m) is nn.Linear for _, _, m in layer_modules(model))
    after = model.decoder.lm.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_load_rejects_bad_files(tmp_path, emu_tokenizer):
    from safetensors.torch import save_file

    q8 = quantize_decoder_linears_(tiny_emu("emu2", tokenizer=emu_tokenizer), weights="int8")
    good = tmp_path / "int8.safetensors"
    save_quantized(q8, good)
    target = tiny_emu("emu2", tokenizer=emu_tokenizer, seed=3)
    before = copy.deepcopy(target.decoder.lm.state_dict())

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_quantized(target, corrupt)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-1000])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_quantized(target, truncated)
    plain = tmp_path / "plain.safetensors"
    save_file({"a": torch.zeros(2)}, plain)
    with pytest.raises(ValueError, match="not an emu_fast quantized checkpoint"):
        load_quantized(target, plain)
    with pytest.raises(FileNotFoundError):
        load_quantized(target, tmp_path / "missing.safetensors")

    state = quantized_state_dict(q8)
    renamed = dict(state.metadata, version="99")
    save_file(state.tensors, tmp_path / "v99.safetensors", metadata=renamed)
    with pytest.raises(ValueError, match="format version '99'"):
        load_quantized(target, tmp_path / "v99.safetensors")
    bad_shape = dict(state.tensors)
    key = "model.layers.1.mlp.down_proj.qweight"
    bad_shape[key] = bad_shape[key][:, :-1].contiguous()
    save_file(bad_shape, tmp_path / "shape.safetensors", metadata=state.metadata)
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.down_proj.qweight is I8 \[64, 95\] in the file"):
        load_quantized(target, tmp_path / "shape.safetensors")
    missing = {k: v for k, v in state.tensors.items() if k != key}
    save_file(missing, tmp_path / "missing_key.safetensors", metadata=state.metadata)
    with pytest.raises(ValueError, match="missing \\['model.layers.1.mlp.down_proj.qweight'\\]"):
        load_quantized(target, tmp_path / "missing_key.safetensors")

    with pytest.raises(ValueError, match="config does not match .*hidden_size: file 64, model 96"):
        load_quantized(tiny_emu("emu2", tokenizer=emu_tokenizer, hidden=96), good)
    with pytest.raises(ValueError, match="holds an emu2 model; this is an emu1 model"):
        load_quantized(tiny_emu("emu1", tokenizer=emu_tokenizer), good)
    _unchanged(target, before)                      # every refusal above left the model as it was

    q4 = quantize_decoder_linears_(tiny_emu("emu2", tokenizer=emu_tokenizer), weights="int4", group_size=32)
    with pytest.raises(ValueError, match="holds int8 weights but the model is already quantized as int4"):
        load_quantized(q4, good)
    with pytest.raises(ValueError, match="not quantized"):
        save_quantized(target, tmp_path / "unquantized.safetensors")


def test_load_rejects_damaged_metadata_and_bad_scales(tmp_path, emu_tokenizer):
    """A config that is valid JSON but not an object, a bad int4 group_size, and scales that are
    NaN, inf, negative or subnormal are refused with ValueError naming what (they raised
    AttributeError, or loaded and gave garbage), the model unchanged. Scales of 0 load: the
    quantizer writes them for an all-zero row or group."""
    from safetensors.torch import save_file

    q4 = quantize_decoder_linears_(tiny_emu("emu2", tokenizer=emu_tokenizer), weights="int4", group_size=32)
    state = quantized_state_dict(q4)
    target = tiny_emu("emu2", tokenizer=emu_tokenizer, seed=3)
    before = copy.deepcopy(target.decoder.lm.state_dict())
    for config in ("[]", "null", "1", '"hidden_size"'):
        save_file(state.tensors, tmp_path / "c.safetensors", metadata=dict(state.metadata, config=config))
        with pytest.raises(ValueError, match=r"damaged metadata \(config is \w+ .* not a JSON object\)"):
            load_quantized(target, tmp_path / "c.safetensors")
    for group in ("0", "-32", "48"):
        save_file(state.tensors, tmp_path / "g.safetensors", metadata=dict(state.metadata, group_size=group))
        with pytest.raises(ValueError, match=r"damaged metadata \(.*group_size must be a positive multiple of 32"):
            load_quantized(target, tmp_path / "g.safetensors")
    key = "model.layers.1.self_attn.o_proj.scales"
    for bad in (float("nan"), float("inf"), -float("inf"), -0.5, 1e-40, 2.0 ** -127):
        tensors = dict(state.tensors)
        tensors[key] = tensors[key].clone()
        tensors[key][3, 1] = bad
        save_file(tensors, tmp_path / "s.safetensors", metadata=state.metadata)
        with pytest.raises(ValueError, match=rf"{key} holds 1 scales that are NaN, inf, negative or subnormal "
                                             rf"\(first .* at \[3, 1\]\)"):
            load_quantized(target, tmp_path / "s.safetensors")
    _unchanged(target, before)
    # a zero row's scales, and the smallest normal scale, load and compute as the quantized model
    tensors = dict(state.tensors)
    tensors[key] = tensors[key].clone()
    tensors[key][3] = 0
    tensors[key][4, 0] = torch.finfo(torch.float32).tiny
    save_file(tensors, tmp_path / "ok.safetensors", metadata=state.metadata)
    load_quantized(target, tmp_path / "ok.safetensors")
    assert torch.equal(target.decoder.lm.model.layers[1].self_attn.o_proj.scales, tensors[key])
