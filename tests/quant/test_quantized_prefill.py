"""Quantized prefill: each projection's weight is written out a chunk of rows at a time into one
reused scratch (kernels/cpu/quantized_gemv.h, dequantize_*_rows) and multiplied while fresh in
cache. The rows written are bitwise the scheme's dequantize (emu_fast.quant.schemes) on every
instruction-set level, odd shapes and groups included, and a prefill cut into many chunks
computes what one chunk computes and what the unquantized decoder computes on the dequantized
weights."""
import copy

import pytest
import torch

from emu_fast import EmuDecoder, _C
from emu_fast.dropin.walk import LAYER_LINEARS
from emu_fast.quant.schemes import dequantize_int4, dequantize_int8, quantize_int4, quantize_int8
from emu_fast.testing import rel_err, tiny_emu

from quant_samples import available_isas, weight, with_isa

# (N, K, group): K not a multiple of int4's blocks of 32; groups shorter than, equal to, longer than a row
SHAPES = [(37, 96, 32), (40, 130, 64), (17, 80, 128), (9, 70, 4096), (64, 256, 256)]


# (the dtype the rows are stored in, the dtype their values are rounded to)
STORED = {"fp32": (torch.float32, torch.float32), "bf16": (torch.bfloat16, torch.bfloat16),
          "bf16_in_fp32": (torch.float32, torch.bfloat16)}


@pytest.mark.parametrize("isa", available_isas())
@pytest.mark.parametrize("stored", STORED)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("N,K,group", SHAPES)
def test_rows_written_out_equal_the_scheme_bitwise(isa, stored, bits, N, K, group):
    dtype, values = STORED[stored]
    w = weight(N, K, seed=N + K, zero_rows=(1,))
    if bits == 8:
        q, s = quantize_int8(w)
        expected = dequantize_int8(q, s, values).to(dtype)
    else:
        q, s = quantize_int4(w, group)
        expected = dequantize_int4(q, s, K, group, values).to(dtype)
    for first, rows in ((0, N), (3, N - 5), (N - 1, 1)):
        out = torch.full((rows, K), float("nan"), dtype=dtype)
        with_isa(isa, lambda: _C._dequantize_weight_rows(q, s, bits, group, first, out, values != dtype))
        assert torch.equal(out, expected[first:first + rows]), (first, rows)


@pytest.fixture
def chunk_bytes():
    yield _C._set_prefill_chunk_bytes
    _C._set_prefill_chunk_bytes(0)


@pytest.mark.parametrize("kind", ["emu1", "emu2"])
@pytest.mark.parametrize("scheme,group", [("int8", None), ("int4", 32)])
def test_prefill_in_many_chunks_equals_one_and_the_dequantized_model(emu_tokenizer, chunk_bytes, kind, scheme, group):
    model = tiny_emu(kind, n=4, tokenizer=emu_tokenizer, kv_heads=2, hidden=96, heads=4, intermediate=160)
    plain = copy.deepcopy(model)
    lm = model.decoder.lm
    head = (lm.stu_regress_head if kind == "emu1" else lm.project_down).weight
    up = None if kind == "emu1" else lm.project_up.weight
    decoder = EmuDecoder.from_llama(lm, head, up, weights=scheme, group_size=group)
    tok = model.decoder.tokenizer(["a photo of a cat[IMG]", "a red fox in tall grass at dawn[IMG]"],
                                  padding="longest", return_tensors="pt")
    embeds = lm.model.embed_tokens(tok.input_ids).detach()
    one = decoder.prefill(embeds, tok.attention_mask)
    chunk_bytes(1)  # 16 rows a chunk: every projection (96 to 320 rows) takes several
    many = decoder.prefill(embeds, tok.attention_mask)
    assert rel_err(many, one) < 1e-5  # the same float32 products; only the GEMM's blocking may differ
    # the unquantized decoder on the weights the quantized one computes with (exact in float32)
    with torch.no_grad():
        for qlayer, layer in zip(lm.model.layers, plain.decoder.lm.model.layers):
            for name in LAYER_LINEARS:
                layer.get_submodule(name).weight.copy_(qlayer.get_submodule(name).dequantize(torch.float32))
    plm = plain.decoder.lm
    reference = EmuDecoder.from_llama(plm, (plm.stu_regress_head if kind == "emu1" else plm.project_down).weight,
                                      None if kind == "emu1" else plm.project_up.weight)
    assert rel_err(many, reference.prefill(embeds, tok.attention_mask)) < 1e-5
