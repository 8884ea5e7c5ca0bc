"""The real Emu language models' shapes and checkpoint names, without their weights: the
configs (tests/data, copied from ../shared/emu) build a LlamaForCausalLM on the meta device (no memory), emu_fast
packs it and builds an EmuDecoder over it, and Emu2's real checkpoint index names exactly the
parameters that model has (so a real checkpoint loads into what accelerate packs)."""
import json

import pytest
import torch

import emu_fast
from helpers import EMU_DATA

transformers = pytest.importorskip("transformers")


def _meta_lm(name):
    path = EMU_DATA / name
    cfg = transformers.LlamaConfig.from_pretrained(str(path))
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)


@pytest.mark.parametrize("name,out_dim,layers,heads", [("emu1_llama_config", 5120, 40, 40),
                                                       ("emu2_llama_config", 1792, 60, 52)])
def test_real_shapes_build_a_decoder(name, out_dim, layers, heads):
    lm = _meta_lm(name)
    H = lm.config.hidden_size
    with torch.device("meta"):
        head = torch.empty(out_dim, H, dtype=torch.bfloat16)
        up = None if out_dim == H else torch.empty(H, out_dim, dtype=torch.bfloat16)
    dec = emu_fast.EmuDecoder.from_llama(lm, head, up, max_batch=8, max_seq_len=1024)
    assert (dec.num_layers, dec.num_heads, dec.head_dim, dec.output_size) == (layers, heads, 128, out_dim)
    assert dec.capacity == (0, 0)  # the cache is sized to requests, allocated on the first
    dec.reserve(8, 1024)
    assert dec.kv_cache.shape == (layers, 2, 8, heads, 1024, 128)
    qkv = lm.model.layers[0].self_attn
    assert qkv.q_proj.weight.shape == qkv.k_proj.weight.shape == (H, H)  # views of the packed tensor


def test_emu2_checkpoint_names_match_the_model():
    lm = _meta_lm("emu2_llama_config")
    index = json.loads((EMU_DATA / "emu2_llama_config" / "pytorch_model.bin.index.json").read_text())
    # The checkpoint was saved by a transformers that kept RoPE's inv_freq as a persistent buffer
    # (4.31 still does; newer ones recompute it and leave it out of the state dict).
    def weights(names):
        return {k for k in names if not k.endswith("rotary_emb.inv_freq")}

    names = set(index["weight_map"])
    assert weights(names) == weights(lm.state_dict())
    assert set(lm.state_dict()) <= names
    emu_fast.dropin.packing.pack_layers(lm)
    assert weights(names) == weights(lm.state_dict())  # packing keeps every name


def test_in_place_load_state_dict_after_accelerate_reaches_the_decoder(emu_tokenizer):
    from emu_fast.testing import rel_err, tiny_emu

    model = tiny_emu("emu1", tokenizer=emu_tokenizer, n=6, seed=1)
    emu_fast.accelerate(model)
    other = tiny_emu("emu1", tokenizer=emu_tokenizer, n=6, seed=2)
    model.load_state_dict(other.state_dict())  # copies into the packed views
    texts = ["a photo of a cat"]
    assert rel_err(model.generate_image(texts), other.generate_image(texts)) < 1e-4
