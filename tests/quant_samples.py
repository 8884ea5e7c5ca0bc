"""What the quantization tests share: the instruction sets this processor runs, sample weights
and GEMV cases, the reference and oracle checks, and the tiny models' quantized projections."""
import torch

from emu_fast import _C
from emu_fast.dropin.walk import LAYER_LINEARS
from emu_fast.quant.schemes import quantize_int4, quantize_int8, round_inputs_to_int8, round_inputs_to_int16


ISAS = _C._cpu_isa_levels()[::-1]  # every level the build knows, best first


def available_isas():
    """The instruction sets this processor runs (the hook refuses the others), best first."""
    have = []
    try:
        for isa in ISAS:
            if _C._set_cpu_isa(isa):
                have.append(isa)
    finally:
        _C._set_cpu_isa("")
    return have


def with_isa(isa, fn):
    assert _C._set_cpu_isa(isa)
    try:
        return fn()
    finally:
        _C._set_cpu_isa("")


def weight(N, K, seed=0, zero_rows=(), scale=None):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * (scale or K ** -0.5)
    for n in zero_rows:
        w[n] = 0
    return w


OP_SHAPES = [  # (B, K, N, group): odd sizes, K not a multiple of the group / of 32 / of 8, B up to 32
    (1, 1, 1, 32), (1, 5120, 40, 128), (3, 77, 13, 32), (2, 300, 9, 64), (5, 129, 7, 128),
    (16, 257, 33, 256), (4, 1000, 17, 128), (32, 64, 6, 32), (2, 8, 3, 32),
]


def op_case(B, K, N, G, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, K, generator=g).to(dtype)
    w = weight(N, K, seed=seed + 1, zero_rows=[N - 1] if N > 2 else [])
    return x, quantize_int8(w), quantize_int4(w, G)


def check_against_reference(out, x, w_deq):
    """out = x @ w_deq^T computed in float64, to float32 accumulation error (float32 out) or
    one bfloat16 rounding of it (bfloat16 out)."""
    expected = x.double() @ w_deq.double().t()
    assert out.dtype == x.dtype and out.shape == expected.shape
    bound = 1e-5 * (x.double().abs() @ w_deq.double().abs().t()) + 1e-6   # |sum| of |terms|: float32 rounding
    if x.dtype == torch.bfloat16:
        bound = bound + expected.abs() * 2.0 ** -8
    err = (out.double() - expected).abs()
    assert (err <= bound).all(), float((err - bound).max())


def with_input(mode, fn):
    _C._set_quantized_input(mode)
    try:
        return fn()
    finally:
        _C._set_quantized_input("")


def int16_case_x(B, K, seed):
    """Blocks of 64 inputs at very different scales: ordinary, an outlier block, tiny (below
    2^-112: the kernels' scalar rounding), zeros; and an input that rounds to 2^15 steps (clamped)."""
    g = torch.Generator().manual_seed(seed)
    block_scale = torch.tensor([1.0, 1e3, 1e-36, 0.0, 3e-3])[torch.arange(-(-K // 64)) % 5]
    x = torch.randn(B, K, generator=g) * block_scale.repeat_interleave(64)[:K]
    x[0, 1:64] = x[0, 1:64].clamp(-0.9, 0.9)
    x[0, 0] = 1 - 2.0 ** -20  # the largest of its block: 32767.97 steps, clamped to 32767
    return x


def check_against_oracle(out, xr, w_deq):
    """out = the rounded inputs xr times the dequantized weights, in float64: the products and
    their block sums are exact, so only float32 scaling and sums across blocks differ."""
    expected = xr @ w_deq.double().t()
    bound = 2e-6 * (xr.abs() @ w_deq.double().abs().t()) + 1e-37
    err = (out.double() - expected).abs()
    assert out.dtype == torch.float32 and (err <= bound).all(), float((err - bound).max())


ROUNDINGS = {"int16": round_inputs_to_int16, "int8": round_inputs_to_int8}


def layer_modules(model):
    body = model.decoder.lm.model
    return [(i, path, layer.get_submodule(path)) for i, layer in enumerate(body.layers) for path in LAYER_LINEARS]


def hf_outputs(model, ids, mask):
    with torch.no_grad():
        out = model.decoder.lm(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    return out.logits, out.hidden_states[-1]
