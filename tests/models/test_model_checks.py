"""Models emu_fast cannot run are refused with a TypeError naming the module, before anything
is packed: quantized linears, non-Linear projections, non-float weights, weights that are not
loaded (offloaded by Hugging Face accelerate, or on the meta device), float16 on the CPU."""
import pytest
import torch
from torch import nn

import emu_fast
from emu_fast.testing import rel_err, tiny_emu

TEXTS = ["a photo of a cat"]


class Linear4bit(nn.Module):
    """Stands in for bitsandbytes.nn.Linear4bit: packed 4-bit weights in a uint8 tensor."""

    def __init__(self, linear):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(linear.weight.numel() // 2, 1, dtype=torch.uint8), requires_grad=False)
        self.bias = None


class Linear8bitLt(nn.Linear):
    """Stands in for bitsandbytes.nn.Linear8bitLt, an nn.Linear subclass with int8 weights."""

    def __init__(self, linear):
        super().__init__(linear.in_features, linear.out_features, bias=False)
        self.weight = nn.Parameter(torch.zeros_like(linear.weight, dtype=torch.int8), requires_grad=False)


class LoraLinear(nn.Module):
    def __init__(self, linear):
        super().__init__()
        self.base_layer = linear
        self.lora_A = nn.Linear(linear.in_features, 2, bias=False)
        self.lora_B = nn.Linear(2, linear.out_features, bias=False)

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(x))


@pytest.mark.parametrize("wrap,message", [
    (Linear4bit, r"model.layers.1.self_attn.k_proj is a quantized Linear4bit .*load the model without quantization"),
    (Linear8bitLt, r"model.layers.1.self_attn.k_proj is a quantized Linear8bitLt"),
    (LoraLinear, r"model.layers.1.self_attn.k_proj must be a torch.nn.Linear, got LoraLinear .*merged"),
])
def test_unrunnable_projection_is_refused_before_packing(wrap, message):
    model = tiny_emu("emu1")
    expected = model.generate_image(TEXTS)
    attn = model.decoder.lm.model.layers[1].self_attn
    original = attn.k_proj
    attn.k_proj = wrap(original)
    with pytest.raises(TypeError, match=message):
        emu_fast.accelerate(model)
    q0 = model.decoder.lm.model.layers[0].self_attn.q_proj
    assert not hasattr(q0, "_emu_fast_packed")  # nothing was packed half-way
    attn.k_proj = original  # and the model works as before, then accelerates
    assert rel_err(model.generate_image(TEXTS), expected) == 0
    emu_fast.accelerate(model)
    assert rel_err(model.generate_image(TEXTS), expected) < 1e-4


def test_non_float_weights_are_refused():
    model = tiny_emu("emu2")
    model.decoder.lm.model.layers[0].mlp.down_proj.double()
    with pytest.raises(TypeError, match="model.layers.0.mlp.down_proj has torch.float64 weights"):
        emu_fast.accelerate(model)


def test_quantized_head_is_refused():
    model = tiny_emu("emu2")
    model.decoder.lm.project_down = Linear8bitLt(model.decoder.lm.project_down)
    with pytest.raises(TypeError, match="decoder.lm.project_down is a quantized Linear8bitLt"):
        emu_fast.accelerate(model)


def test_offloaded_weights_are_refused():
    model = tiny_emu("emu1")
    mlp = model.decoder.lm.model.layers[1].mlp
    mlp.to("meta")
    mlp._hf_hook = object()  # what Hugging Face accelerate leaves on a module it offloaded
    with pytest.raises(TypeError, match=r"model.layers.1.mlp.gate_proj.weight has no data: offloaded to CPU or disk"):
        emu_fast.accelerate(model)


def test_meta_model_is_refused_by_accelerate():
    with torch.device("meta"):
        model = tiny_emu("emu1")
    with pytest.raises(TypeError, match=r"model.layers.0.self_attn.q_proj.weight has no data: the model was built on "
                                        r"the meta device"):
        emu_fast.accelerate(model)


def test_float16_on_the_cpu_runs_on_aten_unless_ours_are_asked_for():
    """Our CPU kernels take float32 and bfloat16: asked for by name they refuse float16 (and
    say what to use); "auto" runs it on the ATen step and matches the model's own loop."""
    model = tiny_emu("emu1").half()
    with pytest.raises(ValueError, match=r'kernels="custom" cannot run here: the CPU kernels take float32 and '
                                         r'bfloat16 only \(use kernels="auto" or "aten"\)'):
        emu_fast.accelerate(model, kernels="custom")
    texts = ["a cat [<IMG_PLH>]", "two dogs"]
    expected = model.generate_image(texts)
    emu_fast.accelerate(model)
    assert model.emu_fast_decoder.kernels == "aten"
    got = model.generate_image(texts)
    assert got.dtype == torch.float16
    assert rel_err(got, expected) < 2e-2
