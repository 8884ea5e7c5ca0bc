"""Decoder segments (emu_fast.dropin.segments): the segment plan and layer_devices unit-tested (devices
are only named: no GPU needed); a decoder cut into segments on one CPU (split_before) gives
bitwise the unsplit decoder's outputs, on the fused CPU step, op by op and on the ATen step,
across cache growth; per-segment KV caches and their memory accounting."""
import types

import pytest
import torch
from torch import nn

from emu_fast.dropin.segments import Segment, layer_devices, plan_segments
from emu_fast.testing import tiny_llama

from decoder_setup import PROMPTS, Setup

CPU, CUDA0, CUDA1 = torch.device("cpu"), torch.device("cuda:0"), torch.device("cuda:1")
LONG = ["a photo of a cat sitting on a red chair " * 40]  # about 400 tokens: past 256 positions
NEAR_FULL = ["a photo of a cat sitting on a red chair " * 12, *PROMPTS[3][1:]]  # ragged, 123 tokens padded


def test_plan_one_device_is_one_segment():
    assert plan_segments([CPU] * 3) == [Segment(0, 3, CPU)]
    assert plan_segments(["cpu"]) == [Segment(0, 1, CPU)]


def test_plan_cuts_where_the_device_changes():
    assert plan_segments([CUDA0, CUDA0, CUDA1, CUDA1]) == [Segment(0, 2, CUDA0), Segment(2, 4, CUDA1)]
    assert plan_segments([CUDA0, CUDA1, CUDA0]) == [Segment(0, 1, CUDA0), Segment(1, 2, CUDA1), Segment(2, 3, CUDA0)]


def test_plan_split_before_cuts_on_one_device():
    assert plan_segments([CPU] * 4, [2]) == [Segment(0, 2, CPU), Segment(2, 4, CPU)]
    assert plan_segments([CPU] * 4, (3, 1, 1)) == [Segment(0, 1, CPU), Segment(1, 3, CPU), Segment(3, 4, CPU)]
    # A cut where the device changes anyway adds nothing.
    assert plan_segments([CUDA0, CUDA0, CUDA1], [2]) == [Segment(0, 2, CUDA0), Segment(2, 3, CUDA1)]


@pytest.mark.parametrize("bad", [0, 3, -1, True, 1.0, "1"])
def test_plan_refuses_bad_split_before(bad):
    with pytest.raises(ValueError, match=r"split_before takes layer indices in 1\.\.2, got " + repr(bad)):
        plan_segments([CPU] * 3, [bad])


def test_plan_needs_a_layer():
    with pytest.raises(ValueError, match="at least one decoder layer"):
        plan_segments([])


class _Placed(nn.Module):
    """Stands in for a layer whose weights sit on the given (possibly absent) devices."""

    def __init__(self, *devices):
        super().__init__()
        self.devices = devices

    def parameters(self, recurse=True):
        return iter([types.SimpleNamespace(device=torch.device(d), is_meta=False) for d in self.devices])


def test_layer_devices_of_a_cpu_model():
    assert layer_devices(tiny_llama(layers=3).model.layers) == [CPU] * 3


def test_layer_devices_over_two_gpus_and_straddling_layers():
    assert layer_devices([_Placed(CUDA0), _Placed(CUDA0, CUDA0), _Placed(CUDA1)]) == [CUDA0, CUDA0, CUDA1]
    with pytest.raises(ValueError, match=r"model\.layers\.1 has weights on \['cuda:0', 'cuda:1'\]; each decoder "
                                         r"layer must sit on one device"):
        layer_devices([_Placed(CUDA0), _Placed(CUDA0, CUDA1)])


@pytest.mark.parametrize("where", ["whole_layer", "part_of_a_layer"])
def test_layer_devices_refuses_offloaded_weights_by_name(where):
    lm = tiny_llama(layers=3)
    if where == "whole_layer":
        lm.model.layers[1].to("meta")
        lm.model.layers[2].to("meta")
    else:
        lm.model.layers[2].mlp.to("meta")
    first = r"model\.layers\.1\.\S+" if where == "whole_layer" else r"model\.layers\.2\.mlp\.\S+"
    with pytest.raises(TypeError, match=first + " has no data"):
        layer_devices(lm.model.layers)


def test_layer_devices_of_a_wholly_meta_model():
    with torch.device("meta"):
        lm = tiny_llama(layers=3)
    assert layer_devices(lm.model.layers) == [torch.device("meta")] * 3


def _setup(kind, tok, dtype=torch.float32):
    """Setup's tiny model with 3 layers (so two cuts fit); split vs unsplit needs no oracle."""
    s = Setup(kind, tok, kv_heads=2, dtype=dtype)
    s.lm = tiny_llama(hidden=64, layers=3, kv_heads=2, seed=3).to(dtype)
    return s


def _split_and_unsplit(s, split_before, **kwargs):
    kwargs = {"max_batch": None, "max_seq_len": None, **kwargs}  # no limits: caches grow to the requests
    split, whole = s.decoder(split_before=split_before, **kwargs), s.decoder(**kwargs)
    bounds = [0, *split_before, 3]
    assert split.segments == [(a, b, "cpu") for a, b in zip(bounds, bounds[1:])]
    assert whole.segments == [(0, 3, "cpu")]
    assert (split.input_device, split.output_device) == ("cpu", "cpu")
    assert split.kernels == whole.kernels
    return split, whole


@pytest.mark.parametrize("kind", ["emu1", "emu2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("step", ["fused", "op_by_op", "aten"])
@pytest.mark.parametrize("split_before", [[1], [2], [1, 2]], ids=str)
def test_split_decoder_equals_unsplit_bitwise(emu_tokenizer, kind, dtype, step, split_before):
    s = _setup(kind, emu_tokenizer, dtype)
    split, whole = _split_and_unsplit(s, split_before, kernels="aten" if step == "aten" else "auto")
    assert split.kernels == ("aten" if step == "aten" else "custom")
    for d in (split, whole):
        d.fused_cpu_step = step == "fused"
    inputs = s.inputs(PROMPTS[3])
    out = split.generate(*inputs, s.n)
    assert torch.equal(out, whole.generate(*inputs, s.n))
    assert out.shape == (3, s.n, s.head.shape[0]) and out.dtype == dtype
    # One KV cache per segment, each with its segment's layers; kv_cache is for one segment only.
    bounds = [0, *split_before, 3]
    assert [kv.shape[0] for kv in split.kv_caches] == [b - a for a, b in zip(bounds, bounds[1:])]
    assert [kv.shape[1:] for kv in split.kv_caches] == [whole.kv_cache.shape[1:]] * len(bounds[1:])
    assert split.lengths == whole.lengths
    for kv, (a, b) in zip(split.kv_caches, zip(bounds, bounds[1:])):
        for row, length in enumerate(split.lengths):  # each row's live positions: the same keys and values
            assert torch.equal(kv[:, :, row, :, :length], whole.kv_cache[a:b, :, row, :, :length])
    with pytest.raises(ValueError, match="kv_caches"):
        split.kv_cache
    assert split.fallback_reason == whole.fallback_reason == ""


@pytest.mark.parametrize("kind", ["emu1", "emu2"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "op_by_op"])
def test_split_decoder_across_cache_growth(emu_tokenizer, kind, fused):
    s = _setup(kind, emu_tokenizer)
    split, whole = _split_and_unsplit(s, [1, 2])
    for d in (split, whole):
        d.fused_cpu_step = fused
    # Growth mid-sequence: steps past the 128-position capacity carry every segment's cache over.
    inputs = s.inputs(NEAR_FULL)
    a, b = split.prefill(*inputs), whole.prefill(*inputs)
    assert split.capacity == (3, 128)
    steps = 130 - max(split.lengths)
    assert 0 < steps < 20
    assert torch.equal(split.decode(a, steps), whole.decode(b, steps))
    assert split.capacity == whole.capacity == (3, 256)
    for texts in (PROMPTS[1], LONG, PROMPTS[3]):  # short, long (past 256 positions), a larger batch again
        inputs = s.inputs(texts)
        assert torch.equal(split.generate(*inputs, s.n), whole.generate(*inputs, s.n))
        assert split.capacity == whole.capacity
    assert split.capacity[0] == 3 and split.capacity[1] > 256


def test_memory_summary_counts_every_segment(emu_tokenizer):
    s = _setup("emu2", emu_tokenizer)
    split, whole = _split_and_unsplit(s, [1, 2])
    assert split.memory_summary()["kv_cache_per_device"] == {"cpu": 0} and split.kv_cache_bytes == 0
    inputs = s.inputs(PROMPTS[3])
    split.generate(*inputs, s.n)
    whole.generate(*inputs, s.n)
    total = sum(kv.numel() * kv.element_size() for kv in split.kv_caches)
    assert total > 0 and split.kv_cache_bytes == total == whole.kv_cache_bytes
    m = split.memory_summary()
    assert m["kv_cache"] == total and m["kv_cache_per_device"] == {"cpu": total}
    assert m["weights"] == whole.memory_summary()["weights"]
