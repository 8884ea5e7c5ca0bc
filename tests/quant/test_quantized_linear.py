"""Int8Linear / Int4Linear (emu_fast.quant.modules): forward against the dequantized weight,
under torch.compile, casts, backward and state dicts."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from emu_fast.quant.modules import GEMV_MAX_ROWS, Int4Linear, Int8Linear


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_quantized_linear_forward(scheme, dtype):
    torch.manual_seed(0)
    lin = nn.Linear(100, 37, bias=True).to(dtype)
    module = Int8Linear.from_linear(lin) if scheme == "int8" else Int4Linear.from_linear(lin, group_size=64)
    assert module.qweight.device.type == "cpu" and module.bias.dtype == dtype
    torch.testing.assert_close(module.bias, lin.bias, rtol=0, atol=0)
    w = module.dequantize(torch.float32)
    assert module.dequantize().dtype == dtype and w.shape == (37, 100)
    x = torch.randn(2, 3, 100).to(dtype)
    with torch.no_grad():
        y = module(x)                                           # 6 rows: the op
        expected = F.linear(x.float(), w, lin.bias.float())
        long_x = torch.randn(GEMV_MAX_ROWS + 5, 100).to(dtype)
        y_long = module(long_x)                                 # past GEMV_MAX_ROWS: dequantize + F.linear
        y_half = module(x.half())                               # a dtype the op does not take
    assert y.shape == (2, 3, 37) and y.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y.float(), expected, **tol)
    torch.testing.assert_close(y_long.float(), F.linear(long_x.float(), w, lin.bias.float()), **tol)
    assert y_half.dtype == torch.float16
    torch.testing.assert_close(y_half.float(), expected, rtol=2e-2, atol=2e-2)
    assert "in_features=100, out_features=37" in repr(module)


def test_quantized_linear_under_torch_compile():
    """The fake kernels let a module using the ops trace whole (fullgraph) and run the ops."""
    torch.manual_seed(0)
    lin = nn.Linear(128, 40, bias=True)
    x = torch.randn(3, 128)
    for module in (Int8Linear.from_linear(lin), Int4Linear.from_linear(lin, group_size=64)):
        with torch.no_grad():
            compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
            torch.testing.assert_close(compiled(x), module(x), rtol=0, atol=0)


def test_quantized_linear_casts_backward_and_state():
    torch.manual_seed(0)
    lin = nn.Linear(64, 9, bias=True)
    module = Int4Linear.from_linear(lin, group_size=32)
    scales, w = module.scales.clone(), module.dequantize()
    module.to(torch.bfloat16)                    # as model.to(torch.bfloat16) does to every module
    assert module.scales.dtype == torch.float32 and torch.equal(module.scales, scales)
    assert module.dtype == module.bias.dtype == module.dequantize().dtype == torch.bfloat16
    torch.testing.assert_close(module.dequantize(torch.float32), w, rtol=0, atol=0)
    module.float()
    assert module.dtype == torch.float32 and torch.equal(module.scales, scales)
    # an input that needs a gradient gets one (the differentiable path), equal to F.linear's
    x = torch.randn(3, 64, requires_grad=True)
    module(x).square().sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    F.linear(x_ref, w, module.bias.float()).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    # state_dict round trip into a fresh module
    fresh = Int4Linear(64, 9, bias=True, group_size=32)
    fresh.load_state_dict(module.state_dict())
    assert torch.equal(fresh.qweight, module.qweight) and torch.equal(fresh.scales, module.scales)
    with pytest.raises(ValueError, match="multiple of 32"):
        Int4Linear(64, 9, group_size=40)
