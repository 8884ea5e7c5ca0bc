"""The CUDA path against the float32 reference: ops (the samples of tests/op_samples.py run in
tests/ops/test_ops.py::test_op_matches_reference_cuda; here the GPU-only cases),
EmuDecoder on the GPU, CUDA-graph replay equal to eager, the drop-in on a CUDA model, and bad
input on CUDA tensors. Skipped without a GPU (the CPU suite covers the same behaviour there)."""
import pytest
import torch

from emu_fast import EmuDecoder, ops, reference
from emu_fast.testing import TinyEmu1, TinyEmu2, rel_err, tiny_llama

import op_samples
from decoder_setup import LOOP_TOL
from op_samples import CUDA_DTYPES, GPU_FP32_TOL, opcheck_samples

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")

DTYPES = CUDA_DTYPES


def close(actual, expected, dtype):  # the GPU's float32 allowance (op_samples.GPU_FP32_TOL)
    op_samples.close(actual, expected, dtype, GPU_FP32_TOL if dtype == torch.float32 else None)


def test_decode_attention_cuda_full_cache_gives_nan_and_writes_nothing():
    """Lengths stay on the GPU (no sync to check them): a full cache yields NaN, not a wrong
    number, and the cache is left as it was."""
    dev = "cuda"
    q, k, v = (torch.randn(1, 2, 64, device=dev) for _ in range(3))
    kc, vc = torch.randn(1, 2, 4, 64, device=dev), torch.randn(1, 2, 4, 64, device=dev)
    cos, sin = (t.to(dev) for t in reference.rope_tables(64, 8, 1e4))
    kc0 = kc.clone()
    out = ops.decode_attention(q, k, v, kc, vc, torch.tensor([4], device=dev), torch.tensor([4], device=dev), cos, sin)
    assert torch.isnan(out).all()
    torch.testing.assert_close(kc, kc0, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_glue_and_splice_cuda(dtype):
    torch.manual_seed(0)
    x, r = torch.randn(3, 5120, device="cuda").to(dtype), torch.randn(3, 5120, device="cuda").to(dtype)
    w = (1 + 0.2 * torch.randn(5120, device="cuda")).to(dtype)
    close(ops.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6), dtype)
    y, s = ops.add_rms_norm(x, r, w, 1e-6)
    close(y, reference.add_rms_norm(x, r, w, 1e-6)[0], dtype)
    close(s, x + r, dtype)
    gu = torch.randn(3, 2 * 1377, device="cuda").to(dtype)
    close(ops.silu_mul(gu), reference.silu_mul(gu), dtype)
    ids = torch.randint(0, 49, (3, 9), device="cuda")  # 49 is the slot id
    ids[:, 2:5] = 49
    table, values = torch.randn(50, 33, device="cuda").to(dtype), torch.randn(9, 33, device="cuda").to(dtype)
    torch.testing.assert_close(ops.splice_embeddings(ids, table, values, 49),
                               reference.splice_embeddings(ids, table, values, 49), rtol=0, atol=0)
    with pytest.raises(ValueError, match="9 slots .* but 8 slot vectors"):
        ops.splice_embeddings(ids, table, values[:8], 49)


def test_opcheck_cuda():
    """The opcheck samples of tests/op_samples.py the CUDA kernels take (decode attention at
    head_dim 64 included)."""
    for name, args in opcheck_samples("cuda"):
        torch.library.opcheck(getattr(torch.ops.emu_fast, name).default, args)


def _decoder_setup(kind, dtype, tok, kv_heads=2):
    lm = tiny_llama(hidden=256, layers=3, heads=4, kv_heads=kv_heads, intermediate=344, seed=3).to("cuda", dtype)
    g = torch.Generator(device="cuda").manual_seed(4)
    d = 256 if kind == "emu1" else 96
    head = (torch.randn(d, 256, generator=g, device="cuda") * 256 ** -0.5).to(dtype)
    up = (torch.randn(256, d, generator=g, device="cuda") * d ** -0.5).to(dtype) if kind == "emu2" else None
    tok.padding_side = "right" if kind == "emu1" else "left"
    return lm, head, up


@pytest.mark.parametrize("kind", ["emu1", "emu2"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_decoder_cuda_matches_reference_and_graph_equals_eager(emu_tokenizer, kind, dtype):
    lm, head, up = _decoder_setup(kind, dtype, emu_tokenizer)
    n = 12
    texts = ["a photo of a cat", "an oil painting of a dog riding a bicycle at dawn, detailed", "hi"]
    placeholder = "[IMG]" + "<image>" * n + "[/IMG]"
    tok = emu_tokenizer([t + "[IMG]" for t in texts], padding="longest", return_tensors="pt")
    table = lm.model.embed_tokens.weight.detach()
    embeds = table[tok.input_ids.cuda()]
    graphed = EmuDecoder.from_llama(lm, head, up, max_batch=4, max_seq_len=128)
    eager = EmuDecoder.from_llama(lm, head, up, max_batch=4, max_seq_len=128)
    eager.use_cuda_graphs = False
    a = graphed.generate(embeds, tok.attention_mask, n)
    b = eager.generate(embeds, tok.attention_mask, n)
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # same kernels, replayed
    a2 = graphed.generate(embeds, tok.attention_mask, n)  # graph reused across calls
    torch.testing.assert_close(a2, a, rtol=0, atol=0)
    # against the float32 reference loop on the CPU
    lm32 = lm.float().cpu()
    w32 = reference.body_weights(lm32)
    shape = reference.LlamaShape.from_hf(lm32.config)
    expected = reference.upstream_generate_image(
        body=lambda e, m: reference.llama_body(w32, shape, e, m), embed_tokens=lambda i: w32["embed_tokens.weight"][i],
        tokenizer=emu_tokenizer, texts=texts, n=n, image_placeholder=placeholder,
        regress=lambda h: h @ head.float().cpu().t(),
        project_up=None if up is None else (lambda o: o @ up.float().cpu().t()))
    assert rel_err(a.cpu(), expected) < LOOP_TOL[dtype]


@pytest.mark.parametrize("build", ["emu1", "emu2"])
def test_accelerate_on_cuda(emu_tokenizer, build):
    lm = tiny_llama(hidden=128, layers=2, heads=2, intermediate=200, kv_heads=1).to("cuda")
    model = (TinyEmu1(emu_tokenizer, lm, n_causal=8) if build == "emu1" else TinyEmu2(emu_tokenizer, lm, n_query=16)).to("cuda")
    texts = ["a photo of a cat", "draw [<IMG_PLH>] again, bigger"]
    image = torch.randn(1, 3, 8, 8, device="cuda")
    expected = model.generate_image(texts, image)
    import emu_fast

    emu_fast.accelerate(model, max_batch=2, max_seq_len=128)
    out = model.generate_image(texts, image)
    assert out.device.type == "cuda"
    assert rel_err(out, expected) < 1e-4


def test_bad_input_on_cuda(emu_tokenizer):
    lm, head, up = _decoder_setup("emu2", torch.bfloat16, emu_tokenizer)
    dec = EmuDecoder.from_llama(lm, head, up, max_batch=2, max_seq_len=64)
    embeds = torch.randn(1, 5, 256, device="cuda", dtype=torch.bfloat16)
    mask = torch.ones(1, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="on cpu but the decoder is on cuda"):
        dec.prefill(embeds.cpu(), mask)
    out = dec.prefill(embeds, mask)
    with pytest.raises(ValueError, match="on cpu but the decoder is on cuda"):
        dec.step(out.cpu())
    with pytest.raises(ValueError, match="is on cpu"):
        ops.gemv(out, head.cpu())
    q = torch.randn(1, 4, 64, device="cuda")
    kc = torch.randn(1, 4, 8, 64, device="cuda")
    cos, sin = (t.cuda() for t in reference.rope_tables(64, 16, 1e4))
    lens = torch.zeros(1, dtype=torch.long, device="cuda")
    with pytest.raises(ValueError, match="k_cache must be contiguous"):
        ops.decode_attention(q, q, q, kc.transpose(2, 3).contiguous().transpose(2, 3), kc.clone(), lens, lens, cos, sin)
    with pytest.raises(ValueError, match="head_dim 32 is not supported on CUDA"):
        q32 = torch.randn(1, 4, 32, device="cuda")
        ops.decode_attention(q32, q32, q32, torch.randn(1, 4, 8, 32, device="cuda"), torch.randn(1, 4, 8, 32, device="cuda"),
                             lens, lens, *(t.cuda() for t in reference.rope_tables(32, 16, 1e4)))
    assert dec.step(out).shape == out.shape  # still usable


def test_decode_attention_cuda_invalid_rows_with_splits():
    """Many splits (long cache, batch 1 row each): a full row and a row past the RoPE table give
    NaN; the valid row is right; neither cache changes where it should not."""
    dev, D, S = "cuda", 128, 1024
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 4, D, device=dev) for _ in range(3))
    kc, vc = torch.randn(3, 4, S, D, device=dev), torch.randn(3, 4, S, D, device=dev)
    cos, sin = (t.to(dev) for t in reference.rope_tables(D, 2 * S, 1e4))
    lens = torch.tensor([S, 500, 10], device=dev)
    pos = torch.tensor([5, 500, 2 * S], device=dev)  # row 2: position outside the table
    kc0, vc0 = kc.clone(), vc.clone()
    out = ops.decode_attention(q, k, v, kc, vc, lens, pos, cos, sin)
    assert torch.isnan(out[0]).all() and torch.isnan(out[2]).all()
    kr, vr = kc0.clone(), vc0.clone()
    expected = reference.decode_attention(q[1:2], k[1:2], v[1:2], kr[1:2], vr[1:2], lens[1:2], pos[1:2], cos, sin, D ** -0.5)
    close(out[1:2], expected, torch.float32)
    torch.testing.assert_close(kc[0], kc0[0], rtol=0, atol=0)
    torch.testing.assert_close(vc[2], vc0[2], rtol=0, atol=0)
    torch.testing.assert_close(kc[1], kr[1], rtol=1e-5, atol=1e-5)


def test_gemv_cuda_strided_input_takes_scalar_path():
    x = torch.randn(3, 257, device="cuda")[:, 1:]  # misaligned rows, stride 257
    w = torch.randn(40, 256, device="cuda")
    close(ops.gemv(x, w), reference.gemv(x, w), torch.float32)


def test_opcheck_cuda_decode_attention():
    torch.manual_seed(0)
    dev = "cuda"
    q, k, v = (torch.randn(2, 4, 64, device=dev) for _ in range(3))
    kc, vc = torch.randn(2, 4, 16, 64, device=dev), torch.randn(2, 4, 16, 64, device=dev)
    cos, sin = (t.to(dev) for t in reference.rope_tables(64, 32, 1e4))
    lens = torch.tensor([3, 0], device=dev)
    torch.library.opcheck(torch.ops.emu_fast.decode_attention.default, (q, k, v, kc, vc, lens, lens + 1, cos, sin, 0.125))


def test_decoder_cuda_head_dim_128_big_batch_and_mixed_calls(emu_tokenizer):
    """Head dim 128 (Emu's), batch 9 (cuBLAS inside the graph), graphs reused across batch
    sizes, and step() mixed with graphed decode(): all equal to the eager decoder."""
    lm = tiny_llama(hidden=256, layers=2, heads=2, intermediate=344, seed=5).to("cuda", torch.bfloat16)
    head = (torch.randn(256, 256, device="cuda") * 0.06).to(torch.bfloat16)
    emu_tokenizer.padding_side = "right"
    graphed = EmuDecoder.from_llama(lm, head, None, max_batch=9, max_seq_len=96)
    eager = EmuDecoder.from_llama(lm, head, None, max_batch=9, max_seq_len=96)
    eager.use_cuda_graphs = False
    assert graphed.head_dim == 128
    table = lm.model.embed_tokens.weight.detach()
    for batch in (9, 2, 9):
        texts = [f"prompt number {i} " + "word " * i for i in range(batch)]
        tok = emu_tokenizer([t + "[IMG]" for t in texts], padding="longest", return_tensors="pt")
        embeds = table[tok.input_ids.cuda()]
        a0, b0 = graphed.prefill(embeds, tok.attention_mask), eager.prefill(embeds, tok.attention_mask)
        a = [a0, graphed.step(a0)]
        b = [b0, eager.step(b0)]
        a.append(graphed.decode(a[-1], 6))
        b.append(eager.decode(b[-1], 6))
        a.append(graphed.step(a[-1][:, -1]))
        b.append(eager.step(b[-1][:, -1]))
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
        assert graphed.lengths == eager.lengths == (tok.attention_mask.sum(1) + 8).tolist()


def test_decoder_cuda_unsupported_head_dim_runs_on_aten():
    """Our CUDA attention takes head_dim 64/128: asked for by name it refuses 32, "auto" runs it
    on the ATen step."""
    lm = tiny_llama(hidden=128, layers=1, heads=4, intermediate=200).to("cuda")  # head dim 32
    head = torch.randn(128, 128, device="cuda")
    with pytest.raises(ValueError, match='kernels="custom" cannot run here: the CUDA attention is compiled for '
                                         "head_dim 64 or 128, not 32"):
        EmuDecoder.from_llama(lm, head, None, kernels="custom")
    assert EmuDecoder.from_llama(lm, head, None).kernels == "aten"


def _cuda_inputs(lm, tok, texts):
    batch = tok([t + "[IMG]" for t in texts], padding="longest", return_tensors="pt")
    return lm.model.embed_tokens.weight.detach()[batch.input_ids.cuda()], batch.attention_mask


TEXTS = ["a photo of a cat", "an oil painting of a dog riding a bicycle at dawn, detailed", "hi"]


@pytest.mark.parametrize("kind", ["emu1", "emu2"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_aten_step_on_cuda_matches_custom_and_graphs(emu_tokenizer, kind, dtype):
    """The portable step on CUDA: graphed (captured like ours) equals eager bit for bit, and it
    agrees with our kernels within the dtype's loop tolerance."""
    lm, head, up = _decoder_setup(kind, dtype, emu_tokenizer)
    embeds, mask = _cuda_inputs(lm, emu_tokenizer, TEXTS)
    aten = EmuDecoder.from_llama(lm, head, up, kernels="aten")
    aten_eager = EmuDecoder.from_llama(lm, head, up, kernels="aten")
    aten_eager.use_cuda_graphs = False
    ours = EmuDecoder.from_llama(lm, head, up, kernels="custom")
    a = aten.generate(embeds, mask, 12)
    torch.testing.assert_close(a, aten_eager.generate(embeds, mask, 12), rtol=0, atol=0)
    assert rel_err(a.float(), ours.generate(embeds, mask, 12).float()) < LOOP_TOL[dtype]


@pytest.mark.parametrize("op", ["gemv", "decode_attention", "gemv_add"])
def test_self_check_on_cuda_falls_back(emu_tokenizer, op):
    """A custom CUDA kernel made wrong on purpose: the first step warns, names the op, and the
    decoder's answer (through graphs) is the ATen step's."""
    from emu_fast import _C

    lm, head, up = _decoder_setup("emu2", torch.float32, emu_tokenizer)
    embeds, mask = _cuda_inputs(lm, emu_tokenizer, TEXTS)
    expected = EmuDecoder.from_llama(lm, head, up, kernels="aten").generate(embeds, mask, 12)
    dec = EmuDecoder.from_llama(lm, head, up)
    _C._set_test_fault(op)
    try:
        with pytest.warns(RuntimeWarning, match=f"at batch size 3: the custom {op} kernel disagrees"):
            got = dec.generate(embeds, mask, 12)
    finally:
        _C._set_test_fault("")
    assert dec.kernels == "aten"
    assert rel_err(got, expected) < 1e-5


def test_split_before_on_one_gpu_is_one_graph_and_bitwise_equal(emu_tokenizer):
    lm, head, up = _decoder_setup("emu2", torch.bfloat16, emu_tokenizer)
    embeds, mask = _cuda_inputs(lm, emu_tokenizer, TEXTS)
    whole = EmuDecoder.from_llama(lm, head, up).generate(embeds, mask, 12)
    split = EmuDecoder.from_llama(lm, head, up, split_before=[1, 2])
    assert len(split.segments) == 3
    torch.testing.assert_close(split.generate(embeds, mask, 12), whole, rtol=0, atol=0)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("kind", ["emu1", "emu2"])
def test_model_split_over_two_gpus_matches_one(emu_tokenizer, kind):
    """Layers 1.. and the head on cuda:1 (as a device_map leaves them): one segment per GPU, the
    cache of each beside its layers, one graph per GPU; the same result as on one GPU."""
    lm, head, up = _decoder_setup(kind, torch.float32, emu_tokenizer)
    embeds, mask = _cuda_inputs(lm, emu_tokenizer, TEXTS)
    whole = EmuDecoder.from_llama(lm, head, up).generate(embeds, mask, 12)
    for layer in lm.model.layers[1:]:
        layer.to("cuda:1")
    lm.model.norm.to("cuda:1")
    head1, up1 = head.to("cuda:1"), None if up is None else up.to("cuda:1")
    split = EmuDecoder.from_llama(lm, head1, up1)
    assert [seg[2] for seg in split.segments] == ["cuda:0", "cuda:1"]
    assert [kv.device.index for kv in split.kv_caches] == [0, 1]
    got = split.generate(embeds, mask, 12)
    assert got.device.index == 1
    torch.testing.assert_close(got.cpu(), whole.cpu(), rtol=1e-5, atol=1e-6)


def test_peak_gpu_memory_after_accelerate(emu_tokenizer):
    """Weights once, the KV cache asked for, and under 5 % of the weights on top (packing,
    prefill activations, the CUDA graph's pool), measured by the caching allocator's peak."""
    import emu_fast

    lm = tiny_llama(hidden=512, layers=8, heads=8, intermediate=1376, dtype=torch.bfloat16, init_std=0.02).to("cuda")
    model = TinyEmu1(emu_tokenizer, lm, n_causal=32).to("cuda")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    # cuBLAS allocates its workspace through the caching allocator on first use: not ours.
    a = torch.ones(2, 512, device="cuda", dtype=torch.bfloat16)
    torch.nn.functional.linear(a, torch.ones(512, 512, device="cuda", dtype=torch.bfloat16))
    del a
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    emu_fast.accelerate(model, max_batch=2, max_seq_len=128)
    model.generate_image(["a photo of a cat", "a watercolor of a fox in tall grass"])
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    kv = model.emu_fast_decoder.kv_cache_bytes
    assert peak - base <= kv + 0.05 * weights, (peak - base, kv, weights)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_cuda_misaligned_cache_uses_scalar_loads(dtype):
    """A contiguous cache view at an odd element offset cannot take vector loads; still right."""
    torch.manual_seed(0)
    B, H, D, S = 2, 4, 128, 40
    q, k, v = (torch.randn(B, H, D, device="cuda").to(dtype) for _ in range(3))
    n = B * H * S * D
    kc = torch.randn(n + 1, device="cuda").to(dtype)[1:].view(B, H, S, D)
    vc = torch.randn(n + 1, device="cuda").to(dtype)[1:].view(B, H, S, D)
    cos, sin = (t.cuda() for t in reference.rope_tables(D, 2 * S, 1e4))
    lens = torch.tensor([7, 39], device="cuda")
    kr, vr = kc.clone(), vc.clone()
    expected = reference.decode_attention(q, k, v, kr, vr, lens, lens, cos, sin, D ** -0.5)
    close(ops.decode_attention(q, k, v, kc, vc, lens, lens, cos, sin), expected, dtype)


@pytest.mark.parametrize("kind", ["emu1", "emu2"])
def test_decoder_cuda_grows_mid_sequence_and_recaptures_graphs(emu_tokenizer, kind):
    """No capacity arguments: the cache grows while decoding (graphs hold the old cache's
    addresses, so they are dropped and captured again); graphed equals eager bitwise and the
    first outputs match a decoder that was big enough from the start."""
    dtype = torch.float32
    lm, head, up = _decoder_setup(kind, dtype, emu_tokenizer)
    tok = emu_tokenizer(["a photo of a cat", "hi"], padding="longest", return_tensors="pt")
    embeds = lm.model.embed_tokens.weight.detach()[tok.input_ids.cuda()]
    graphed, eager, big = (EmuDecoder.from_llama(lm, head, up) for _ in range(3))
    eager.use_cuda_graphs = False
    big.reserve(2, 512)
    outs = []
    for d in (graphed, eager, big):
        first = d.prefill(embeds, tok.attention_mask)
        assert d.capacity[1] >= 128
        part = torch.cat([first[:, None], d.decode(first, 8)], 1)
        outs.append(torch.cat([part, d.decode(part[:, -1], 300)], 1))  # grows to 384 mid-sequence
    assert graphed.capacity == eager.capacity and graphed.capacity[1] >= 384
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    close(outs[0][:, :9], outs[2][:, :9], dtype)


def test_decoder_cuda_refuses_a_cache_larger_than_free_memory(emu_tokenizer):
    lm, head, up = _decoder_setup("emu1", torch.float32, emu_tokenizer)
    dec = EmuDecoder.from_llama(lm, head, up)
    with pytest.raises(ValueError, match=r"needs \d+ bytes but only \d+ bytes are free on cuda"):
        dec.reserve(1, 10**9)
    assert dec.capacity == (0, 0)
    tok = emu_tokenizer(["a photo of a cat"], return_tensors="pt")
    embeds = lm.model.embed_tokens.weight.detach()[tok.input_ids.cuda()]
    assert dec.generate(embeds, tok.attention_mask, 4).shape == (1, 4, 256)
    m = dec.memory_summary()
    assert m["kv_cache"] == dec.kv_cache.numel() * 4 and m["scratch"] > 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("B,K", [(1, 5120), (3, 1000), (12, 256)])
def test_quantized_gemv_cuda(dtype, scheme, B, K):
    """emu_fast::gemv_int8 / gemv_int4 on the GPU against x @ dequantize(...)^T, including a K the
    int4 kernel reads zero-padded, int8's scalar loop (K % 16 != 0) and two batch launches; the
    same op on the CPU agrees to the dtype's tolerance, and opcheck passes."""
    from emu_fast.quant import schemes as quantize
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, K, generator=g) * K ** -0.5
    x = torch.randn(B, K, generator=g).to(dtype)
    args = quantize.quantize_int8(w) if scheme == "int8" else (*quantize.quantize_int4(w, 128), 128)
    op = getattr(ops, f"gemv_{scheme}")
    cuda_args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)
    out = op(x.cuda(), *cuda_args)
    close(out.cpu(), getattr(reference, f"gemv_{scheme}")(x, *args), dtype)
    torch.library.opcheck(getattr(torch.ops.emu_fast, f"gemv_{scheme}").default, (x.float().cuda(), *cuda_args))


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_accelerate_quantizes_a_cpu_model_onto_the_gpu_layer_by_layer(emu_tokenizer, scheme):
    """accelerate(model on the CPU, weights=..., device="cuda"): the whole model ends up on the
    GPU, quantized; at no moment did the GPU hold more than the result plus one float layer; the
    images match the same quantization run on the CPU."""
    import copy

    import emu_fast

    lm = tiny_llama(hidden=512, layers=8, heads=8, intermediate=1376, dtype=torch.bfloat16, init_std=0.02)
    model = TinyEmu1(emu_tokenizer, lm, n_causal=32)
    twin = copy.deepcopy(model)
    layer_bytes = sum(p.numel() * p.element_size() for p in lm.model.layers[0].parameters())
    a = torch.ones(2, 512, device="cuda", dtype=torch.bfloat16)  # cuBLAS's workspace: not ours
    torch.nn.functional.linear(a, torch.ones(512, 512, device="cuda", dtype=torch.bfloat16))
    del a
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    emu_fast.accelerate(model, weights=scheme, device="cuda", max_batch=2, max_seq_len=128)
    torch.cuda.synchronize()
    after, peak = torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
    assert peak - after <= layer_bytes, (peak - after, layer_bytes)
    assert {t.device.type for t in list(model.parameters()) + list(model.buffers())} == {"cuda"}
    assert model.emu_fast_decoder.weights == scheme
    texts = ["a photo of a cat", "a watercolor of a fox in tall grass"]
    out = model.generate_image(texts)
    expected = emu_fast.accelerate(twin, weights=scheme).generate_image(texts)
    assert out.device.type == "cuda" and rel_err(out.cpu(), expected) < LOOP_TOL[torch.bfloat16]
    # the model's own forward runs the CUDA op on the quantized modules
    lin = model.decoder.lm.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 512, device="cuda", dtype=torch.bfloat16)
    close(lin(x).float().cpu(), (x.float() @ lin.dequantize(torch.float32).T).cpu(), torch.bfloat16)
