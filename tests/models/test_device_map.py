"""Models placed by Hugging Face accelerate, as the Emu2 README loads Emu2 (infer_auto_device_map +
load_checkpoint_and_dispatch leave a hook on every module and each weight where the device_map
says). On one CPU: a model dispatched module by module runs under emu_fast and matches its own
loop; a layer offloaded to disk (meta weights behind hooks) is refused, naming it."""
import pytest

import emu_fast
from emu_fast.testing import rel_err, tiny_emu

accelerate = pytest.importorskip("accelerate")

TEXTS = ["a photo of a cat [<IMG_PLH>]", "two dogs on a beach at dawn"]


def _device_map(lm, layer_devices):
    """A device_map naming every top-level module and each decoder layer, as accelerate's
    infer_auto_device_map with no_split_module_classes=['LlamaDecoderLayer'] writes one."""
    body = lm.model
    dm = {f"model.{name}": "cpu" for name, _ in body.named_children() if name != "layers"}
    dm.update({f"model.layers.{i}": d for i, d in enumerate(layer_devices)})
    dm.update({name: "cpu" for name, _ in lm.named_children() if name != "model"})
    return dm


@pytest.mark.parametrize("kind", ["emu1", "emu2"])
def test_dispatched_model_runs_and_matches_its_own_loop(kind):
    model = tiny_emu(kind)
    lm = model.decoder.lm
    accelerate.dispatch_model(lm, device_map=_device_map(lm, ["cpu"] * len(lm.model.layers)), force_hooks=True)
    assert any(hasattr(m, "_hf_hook") for m in lm.modules())  # placed by accelerate, hooks and all
    expected = model.generate_image(TEXTS)
    emu_fast.accelerate(model)
    assert [seg[2] for seg in model.emu_fast_decoder.segments] == ["cpu"]
    assert rel_err(model.generate_image(TEXTS), expected) < 1e-4


def test_layer_offloaded_to_disk_is_refused_by_name(tmp_path):
    model = tiny_emu("emu1")
    lm = model.decoder.lm
    accelerate.dispatch_model(lm, device_map=_device_map(lm, ["cpu", "disk"]), offload_dir=str(tmp_path))
    assert all(p.is_meta for p in lm.model.layers[1].parameters())
    with pytest.raises(TypeError, match=r"model\.layers\.1\.\S+ has no data: offloaded to CPU or disk by Hugging "
                                        r"Face accelerate"):
        emu_fast.accelerate(model)
    assert not hasattr(model, "emu_fast_decoder")  # refused before anything was packed or built
