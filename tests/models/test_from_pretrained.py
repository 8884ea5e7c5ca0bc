"""emu_fast.from_pretrained: Emu checkpoints in every layout (hub safetensors and fp32 pickle
shards, native Emu2 and Emu1 single files, "module"-wrapped, emu_fast's own quantized files),
written here from tiny models with the real tensor names, loaded a tensor at a time into a
ready generator, and held to the model they were written from: its own generate_image (fp32
1e-4), quantized loads equal to quantizing that model in place, every bad checkpoint refused
naming the file and the tensor, and the host memory a multi-shard load takes measured."""
import copy
import json
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

import emu_fast
from emu_fast.dropin.packing import pack_layers
from emu_fast.loading import CheckpointError
from emu_fast.quant.apply import quantize_decoder_linears_
from emu_fast.quant.io import save_quantized
from emu_fast.testing import emu_tokenizer, rel_err, tiny_emu, tiny_emu2_hub

from helpers import ROOT, hub_folder, hub_image_vectors, save_sharded

TEXTS = ["a photo of a cat", "an oil painting [<IMG_PLH>] of a dog riding a bicycle, at dawn", "a [<IMG_PLH>]"]


def image(count, seed=0):
    return torch.randn(count, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def native_emu2_state(model):
    """A native Emu2 file's names: the LLaMA under decoder.lm, the head as upstream saves it
    (stu_regress_head, renamed project_down on loading), project_up as vl_adapter.projection."""
    state = {}
    for k, v in model.state_dict().items():
        k = k.replace("decoder.lm.project_down.", "decoder.lm.stu_regress_head.")
        k = k.replace("decoder.lm.project_up.", "vl_adapter.projection.")
        state[k] = v
    return state


# ------------------------------------------------------------------------------ every layout


@pytest.mark.parametrize("pickles", [False, True], ids=["safetensors", "fp32-pickles"])
def test_hub_pipeline_folder(tmp_path, pickles):
    model = tiny_emu2_hub(n=16)
    root = hub_folder(tmp_path, model, pickles=pickles)
    tok = emu_tokenizer(padding_side="left")
    expected = model.generate_image(TEXTS, tok, image(2))
    for where in (root, root / "multimodal_encoder", *sorted((root / "multimodal_encoder").glob("*.index*.json"))):
        gen = emu_fast.from_pretrained(where, dtype=torch.float32)
        assert (gen.family, gen.n, gen.weights) == ("emu2-hub", 16, None)
        assert gen.tokenizer.padding_side == "left"  # the pipeline's tokenizer/, as saved
        out = gen.generate_image(TEXTS, hub_image_vectors(model, image(2)))
        assert out.shape == expected.shape and rel_err(out, expected) < 1e-4


def test_hub_fp32_shards_loaded_as_bfloat16(tmp_path):
    model = tiny_emu2_hub(n=16)
    root = hub_folder(tmp_path, model, pickles=True)
    tok = emu_tokenizer(padding_side="left")
    truth = model.generate_image(TEXTS[:2], tok)
    own_bf16 = copy.deepcopy(model).bfloat16().generate_image(TEXTS[:2], tok)
    gen = emu_fast.from_pretrained(root)  # dtype bfloat16 by default
    assert gen.dtype == torch.bfloat16 and gen.embed_tokens.dtype == torch.bfloat16
    out = gen.generate_image(TEXTS[:2])
    assert out.dtype == torch.bfloat16
    # as every bf16 test: at most twice the error of the model's own bfloat16 loop against float32
    assert rel_err(out, truth) <= 2 * rel_err(own_bf16, truth)


@pytest.mark.parametrize("wrapped", [False, True], ids=["plain", "module"])
def test_native_emu2_single_file(tmp_path, wrapped):
    model = tiny_emu("emu2", n=16)
    state = native_emu2_state(model)
    torch.save({"module": state} if wrapped else state, tmp_path / "emu2.pt")
    expected = model.generate_image(TEXTS, image(2))
    gen = emu_fast.from_pretrained(tmp_path / "emu2.pt", dtype=torch.float32, config=model.decoder.lm.config,
                                   tokenizer=model.decoder.tokenizer)
    assert (gen.family, gen.n) == ("emu2", 64)  # n: Emu2's, as the file does not say
    gen = emu_fast.from_pretrained(tmp_path / "emu2.pt", dtype=torch.float32, config=model.decoder.lm.config,
                                   tokenizer=model.decoder.tokenizer, n=16)
    vectors = model.decoder.lm.project_up(model.encode_image(image(2))).reshape(-1, 64)
    assert rel_err(gen.generate_image(TEXTS, vectors), expected) < 1e-4


@pytest.mark.parametrize("fmt", ["pytorch_model.bin", "model.safetensors"])
def test_emu1_file_with_its_config_beside(tmp_path, fmt):
    model = tiny_emu("emu1", n=8)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    (torch.save if fmt.endswith(".bin") else lambda s, p: save_file(s, str(p)))(state, tmp_path / fmt)
    model.decoder.lm.config.to_json_file(str(tmp_path / "config.json"))
    emu_tokenizer().save_pretrained(str(tmp_path))  # a tokenizer in the folder: found, set to Emu1's side
    expected = model.generate_image(TEXTS[:2])
    gen = emu_fast.from_pretrained(tmp_path, dtype=torch.float32, n=8)
    assert gen.family == "emu1" and gen.tokenizer.padding_side == "right"
    assert rel_err(gen.generate_image(TEXTS[:2]), expected) < 1e-4


# ------------------------------------------------------------------------------ quantized


@pytest.mark.parametrize("weights,group", [("int8", None), ("int4", 32)])
def test_quantized_load_equals_quantizing_the_model_in_place(tmp_path, weights, group):
    model = tiny_emu2_hub(n=16, hidden=128, intermediate=192)
    root = hub_folder(tmp_path, model)
    gen = emu_fast.from_pretrained(root, dtype=torch.float32, weights=weights, group_size=group)
    assert gen.weights == weights and gen.decoder.weights == weights
    quantize_decoder_linears_(model, weights=weights, group_size=group or 128)
    packed = pack_layers(model.model.decoder.lm, quantized=True)
    for ours, theirs in zip(gen._tensors["slots"].decoder_layers(), packed):  # the tensors the decoder reads
        for a, b in zip(ours, theirs):
            assert torch.equal(a, b)
    tok = emu_tokenizer(padding_side="left")
    expected = model.generate_image(TEXTS[:2], tok)  # the model's own forward on its quantized weights
    assert rel_err(gen.generate_image(TEXTS[:2]), expected) < 1e-4

    # saved once, loaded as it is in seconds (no config or tokenizer needed beside it)
    gen.save_quantized(tmp_path / "emu2-hub-q.safetensors")
    again = emu_fast.from_pretrained(tmp_path / "emu2-hub-q.safetensors", dtype=torch.float32, tokenizer=tok)
    assert (again.weights, again.group_size, again.n, again.family) == (weights, group, 16, "emu2-hub")
    assert torch.equal(again.generate_image(TEXTS[:2]), gen.generate_image(TEXTS[:2]))
    with pytest.raises(CheckpointError, match="holds .* weights; weights='int.' asks for another scheme"):
        emu_fast.from_pretrained(tmp_path / "emu2-hub-q.safetensors", weights="int4" if weights == "int8" else "int8")


def test_save_quantized_of_a_model_loads(tmp_path):
    model = tiny_emu("emu1", n=8)
    quantize_decoder_linears_(model, weights="int8")
    expected = model.generate_image(TEXTS[:2])
    save_quantized(model, tmp_path / "emu1-int8.safetensors")
    gen = emu_fast.from_pretrained(tmp_path / "emu1-int8.safetensors", dtype=torch.float32,
                                   tokenizer=model.decoder.tokenizer, n=8)
    assert gen.family == "emu1" and gen.weights == "int8"
    assert rel_err(gen.generate_image(TEXTS[:2]), expected) < 1e-4


# ------------------------------------------------------------------------------ bad checkpoints


def _single_hub_file(tmp_path, edit):
    """A hub-named single safetensors file with its config beside, edited by `edit(state, config)`."""
    model = tiny_emu2_hub(n=16)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    config = json.loads(model.config.to_json_string())
    edit(state, config)
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path / "model.safetensors"


LAYER0 = "model.decoder.lm.model.layers.0."


@pytest.mark.parametrize("edit,message", [
    (lambda s, c: s.pop(LAYER0 + "mlp.up_proj.weight"), r"lacks the model's layers\.0\.mlp\.up_proj\.weight"),
    (lambda s, c: s.update({"model.decoder.lm.model.layers.7.mlp.up_proj.weight": torch.zeros(96, 64)}),
     r"tensors this emu2-hub config \(2 layers\) does not have: model\.decoder\.lm\.model\.layers\.7"),
    (lambda s, c: s.update({"model.decoder.lm.model.layers.0.mlp.gate.weight": torch.zeros(96, 64)}),
     r"does not have: model\.decoder\.lm\.model\.layers\.0\.mlp\.gate\.weight"),
    (lambda s, c: s.update({LAYER0 + "self_attn.k_proj.weight": torch.zeros(32, 64)}),
     r"model\.layers\.0\.self_attn\.k_proj\.weight has shape \[32, 64\]; the config .* gives \[64, 64\]"),
    (lambda s, c: s.update({LAYER0 + "self_attn.k_proj.weight": torch.zeros(64, 64, dtype=torch.int32)}),
     r"k_proj\.weight is torch\.int32, not a float tensor"),
    (lambda s, c: c.update(hidden_size=128), r"has shape \[.*\]; the config .*hidden 128"),
    (lambda s, c: c.update(vocab_size=32000), r"embed_tokens\.weight has 32004 rows; the config's vocab_size is 32000"),
    (lambda s, c: s.pop("project_down.weight"), r"lacks the model's head"),
    (lambda s, c: s.update({"project_up.weight": torch.zeros(64, 24)}), r"project_up\.weight takes 24 inputs; the head"),
    (lambda s, c: c.pop("num_attention_heads"), r"config lacks a LLaMA field or has a bad one"),
], ids=["missing", "extra-layer", "unknown-name", "shape", "dtype", "config-hidden", "config-vocab", "no-head",
        "up-vs-head", "config-field"])
def test_bad_checkpoint_is_refused_naming_the_file_and_tensor(tmp_path, edit, message):
    path = _single_hub_file(tmp_path, edit)
    with pytest.raises(CheckpointError, match=message) as info:
        emu_fast.from_pretrained(path, dtype=torch.float32, tokenizer=emu_tokenizer(padding_side="left"))
    assert str(path.parent) in str(info.value)


def test_truncated_file_missing_shard_and_code_pickle_are_refused(tmp_path):
    path = _single_hub_file(tmp_path, lambda s, c: None)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable checkpoint"):
        emu_fast.from_pretrained(path)

    model = tiny_emu2_hub(n=16)
    root = hub_folder(tmp_path / "h", model)
    shard = next((root / "multimodal_encoder").glob("*-00002-of-*.safetensors"))
    shard.unlink()
    with pytest.raises(CheckpointError, match=r"names shard\(s\) that are not there: model\.bf16-00002-of-00002"):
        emu_fast.from_pretrained(root)

    (tmp_path / "code").mkdir()
    with open(tmp_path / "code" / "pytorch_model.bin", "wb") as f:
        pickle.dump({"weights": CheckpointError("not a tensor")}, f)
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: needs code to unpickle"):
        emu_fast.from_pretrained(tmp_path / "code", config={"hidden_size": 64})

    (tmp_path / "noconf").mkdir()
    torch.save(native_emu2_state(tiny_emu("emu2", n=16)), tmp_path / "noconf" / "emu2.pt")
    with pytest.raises(CheckpointError, match="has no config.json; pass config="):
        emu_fast.from_pretrained(tmp_path / "noconf" / "emu2.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        emu_fast.from_pretrained(tmp_path / "nowhere")


def test_bad_arguments_and_requests():
    with pytest.raises(TypeError, match="dtype must be"):
        emu_fast.from_pretrained("x", dtype=torch.int8)
    with pytest.raises(ValueError, match="group_size applies to weights='int4' only"):
        emu_fast.from_pretrained("x", weights="int8", group_size=64)
    with pytest.raises(ValueError, match="unknown weight scheme|weights"):
        emu_fast.from_pretrained("x", weights="int3")


def test_generator_without_tokenizer_and_bad_requests(tmp_path):
    model = tiny_emu("emu2", n=16)
    torch.save(native_emu2_state(model), tmp_path / "emu2.pt")
    gen = emu_fast.from_pretrained(tmp_path / "emu2.pt", dtype=torch.float32, config=model.decoder.lm.config, n=16)
    assert gen.tokenizer is None
    with pytest.raises(ValueError, match="no tokenizer"):
        gen.generate_image(TEXTS[:1])
    gen.tokenizer = model.decoder.tokenizer
    with pytest.raises(TypeError, match="list of prompt strings"):
        gen.generate_image("a cat")
    with pytest.raises(ValueError, match="16 <image> slots but the prompt images give 3 vectors"):
        gen.generate_image(["a [<IMG_PLH>]"], torch.zeros(3, 64))
    expected = model.generate_image(TEXTS[:1])
    assert rel_err(gen.generate_image(TEXTS[:1]), expected) < 1e-4  # still usable


# ------------------------------------------------------------------------------ host memory

LOADER = textwrap.dedent("""
    import json, resource, sys, torch
    torch.set_num_threads(1)
    import emu_fast

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    before = status("VmRSS")
    try:  # the peak from here on, not the interpreter's start-up (Linux: reset the high-water mark)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = status("VmHWM") <= before + (8 << 20)
    except OSError:
        reset = False
    gen = emu_fast.from_pretrained(sys.argv[1], dtype=torch.bfloat16, weights="int4", progress=False)
    peak = status("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"before": before, "peak": peak, "after": status("VmRSS"), "reset": reset}))
""")


def test_multi_shard_load_holds_about_one_shard_plus_one_layer(tmp_path):
    """A 4-shard fp32 checkpoint (~0.9 GB: one shard of embeddings, one per layer) loaded as int4
    in a fresh process: the memory it takes beyond what it keeps (peak - after) stays within the
    largest shard plus one float layer (plus 64 MB for the allocator), not the whole checkpoint."""
    hidden, inter, layers = 2048, 5632, 3
    folder = tmp_path / "big"
    folder.mkdir()
    writer = textwrap.dedent(f"""
        import json, sys, torch
        from safetensors.torch import save_file
        torch.manual_seed(0)
        folder, hidden, inter, layers = sys.argv[1], {hidden}, {inter}, {layers}
        cfg = dict(vocab_size=32004, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                   num_attention_heads=16, rms_norm_eps=1e-6, d_model=64, vision_config=dict(n_query=4))
        json.dump(cfg, open(folder + "/config.json", "w"))
        weight_map = {{}}
        def shard(i, tensors):
            name = f"model-{{i:05d}}-of-{{layers + 1:05d}}.safetensors"
            save_file(tensors, folder + "/" + name)
            weight_map.update({{k: name for k in tensors}})
        p = "model.decoder.lm.model."
        shard(1, {{p + "embed_tokens.weight": torch.randn(32004, hidden) * 0.02, p + "norm.weight": torch.ones(hidden),
                  "project_down.weight": torch.randn(64, hidden) * 0.02, "project_up.weight": torch.randn(hidden, 64) * 0.02}})
        for i in range(layers):
            l = p + f"layers.{{i}}."
            t = {{l + n: torch.ones(hidden) for n in ("input_layernorm.weight", "post_attention_layernorm.weight")}}
            t.update({{l + f"self_attn.{{n}}_proj.weight": torch.randn(hidden, hidden) * 0.02 for n in "qkvo"}})
            t.update({{l + "mlp.gate_proj.weight": torch.randn(inter, hidden) * 0.02,
                      l + "mlp.up_proj.weight": torch.randn(inter, hidden) * 0.02,
                      l + "mlp.down_proj.weight": torch.randn(hidden, inter) * 0.02}})
            shard(i + 2, t)
        json.dump({{"weight_map": weight_map}}, open(folder + "/model.safetensors.index.json", "w"))
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", writer, str(folder)], check=True, timeout=300, env=env)
    shards = sorted(folder.glob("*.safetensors"))
    assert len(shards) == layers + 1
    largest = max(p.stat().st_size for p in shards)
    total = sum(p.stat().st_size for p in shards)
    float_layer = (4 * hidden * hidden + 3 * hidden * inter) * 4
    done = subprocess.run([sys.executable, "-c", LOADER, str(folder)], capture_output=True, text=True, timeout=300,
                          env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    m = json.loads(done.stdout.strip().splitlines()[-1])
    transient = m["peak"] - m["after"]
    print(f"\nload of {total / 2**20:.0f} MB in {len(shards)} shards (largest {largest / 2**20:.0f} MB): RSS "
          f"{m['before'] / 2**20:.0f} -> peak {m['peak'] / 2**20:.0f} -> {m['after'] / 2**20:.0f} MB; transient "
          f"{transient / 2**20:.0f} MB (bound {(largest + float_layer) / 2**20 + 64:.0f} MB; peak since the load began: "
          f"{m['reset']})")
    assert transient <= largest + float_layer + (64 << 20)
    assert transient < total  # the bound above is not the whole checkpoint


def test_quantized_load_holds_one_float_projection_on_the_device_at_a_time(tmp_path, monkeypatch):
    """The device-memory claim without a device: every float projection moved to the target is
    dead (quantized and freed) before the next one arrives, so the device holds the result plus
    one float projection at most, never a float layer."""
    import weakref

    from emu_fast.loading.slots import Slots

    model = tiny_emu2_hub(n=16, hidden=128, intermediate=192, layers=3)
    root = hub_folder(tmp_path, model)
    alive, seen = [], [0]
    put = Slots.put_projection

    def watched(self, i, param, w):
        assert all(ref() is None for ref in alive), "a float projection outlived its quantization"
        alive.append(weakref.ref(w))
        seen[0] += 1
        return put(self, i, param, w)

    monkeypatch.setattr(Slots, "put_projection", watched)
    gen = emu_fast.from_pretrained(root, dtype=torch.float32, weights="int4", group_size=64)
    assert seen[0] == 3 * 7 and all(ref() is None for ref in alive)
    assert all(t.dtype in (torch.uint8, torch.float32) for layer in gen._tensors["slots"].decoder_layers()
               for t in layer[1:3] + layer[4:])


def test_non_finite_weight_is_refused_when_quantizing(tmp_path):
    def poison(state, config):
        state[LAYER0 + "mlp.down_proj.weight"][3, 5] = float("nan")

    path = _single_hub_file(tmp_path, poison)
    gen = emu_fast.from_pretrained(path, dtype=torch.float32)  # a float load takes the model as it is
    assert gen.weights is None
    with pytest.raises(CheckpointError, match=r"layers\.0\.mlp\.down_proj\.weight: .*inf or NaN"):
        emu_fast.from_pretrained(path, dtype=torch.float32, weights="int8")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0, 1e-40])
def test_prequantized_file_with_bad_scales_is_refused(tmp_path, bad):
    model = tiny_emu2_hub(n=16, hidden=128, intermediate=192)
    gen = emu_fast.from_pretrained(hub_folder(tmp_path, model), dtype=torch.float32, weights="int8")
    gen.save_quantized(tmp_path / "q.safetensors")
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "q.safetensors"))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "q.safetensors"), "pt") as f:
        metadata = f.metadata()
    state["model.layers.1.mlp.up_proj.scales"][7] = bad
    save_file(state, str(tmp_path / "bad.safetensors"), metadata=metadata)
    with pytest.raises(CheckpointError, match=r"layers\.1\.mlp\.up_proj\.scales holds scales that are NaN, inf, "
                                              r"negative or subnormal"):
        emu_fast.from_pretrained(tmp_path / "bad.safetensors", tokenizer=emu_tokenizer(padding_side="left"))
