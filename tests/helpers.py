"""What several test modules share: where the carried Emu data lives, tolerances, comparisons,
building the emulators' libraries. Test modules import this, never each other."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Iterable, List, Optional


ROOT = Path(__file__).resolve().parents[1]
# The real Emu language-model configs (and Emu2's checkpoint index), carried in tests/data as
# copied from ../shared/emu; EMU_SHARED_DIR points the tests at another copy.
EMU_DATA = Path(os.environ.get("EMU_SHARED_DIR") or ROOT / "tests" / "data")


def save_sharded(state, folder, shards, file_name="model.bf16-{:05d}-of-{:05d}.safetensors",
                 index_name="model.safetensors.index.json"):
    """A hub-style sharded checkpoint of `state` in `folder`: tensors dealt over `shards` files
    named `file_name.format(i, shards)` (safetensors, or torch.save pickles for a .bin name) and
    the index `index_name` mapping each tensor to its file."""
    import json

    import torch
    from safetensors.torch import save_file

    names = sorted(state)
    weight_map = {}
    for i in range(shards):
        part = {k: state[k].contiguous() for k in names[i::shards]}
        file = file_name.format(i + 1, shards)
        if file.endswith(".safetensors"):
            save_file(part, str(Path(folder) / file))
        else:
            torch.save(part, Path(folder) / file)
        weight_map.update({k: file for k in part})
    (Path(folder) / index_name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def hub_folder(tmp_path, model, *, pickles=False, fp32_on_disk=True):
    """The Emu2-Gen pipeline's folder: multimodal_encoder/ (config.json, shards, index) and tokenizer/."""
    enc = tmp_path / "Emu2-Gen" / "multimodal_encoder"
    enc.mkdir(parents=True)
    state = {k: v if fp32_on_disk else v.bfloat16() for k, v in model.state_dict().items()}
    if pickles:  # BAAI/Emu2's fp32 pickle shards
        save_sharded(state, enc, 3, "pytorch_model-{:05d}-of-{:05d}.bin", "pytorch_model.bin.index.json")
    else:
        save_sharded(state, enc, 2, index_name="model.safetensors.index.bf16.json")
    (enc / "config.json").write_text(model.config.to_json_string())
    from emu_fast.testing import emu_tokenizer

    emu_tokenizer(padding_side="left").save_pretrained(str(tmp_path / "Emu2-Gen" / "tokenizer"))
    return tmp_path / "Emu2-Gen"


def hub_image_vectors(model, img):
    """A hub model's prompt images as from_pretrained's generator takes them: slot vectors [images * n, hidden]."""
    return model.project_up(model.model.encode_image(img)).reshape(-1, model.config.hidden_size)


# ------------------------------------------------------------------ the emulators' libraries


def compiler() -> Optional[str]:
    """The C++ compiler the emulators are built with: $CXX, else g++ or c++ on PATH."""
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def sources_key(files: Iterable[Path]) -> str:
    """16 hex digits that change with the name or contents of any of `files`."""
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + f.read_bytes())
    return digest.hexdigest()[:16]


def build_shared_library(cmd: List[str], out: Path, sanitizer_flags: List[str]) -> None:
    """Compiles `cmd` (a compiler command without its -o) into the shared library `out`: with
    `sanitizer_flags` where the compiler has the sanitizer, else without. Written under a name of
    this process and renamed into place, so processes building at once never load a half-written
    file."""
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    cmd = [*cmd, "-o", str(tmp)]
    if subprocess.run(cmd + sanitizer_flags, capture_output=True).returncode != 0:
        subprocess.run(cmd, check=True)
    tmp.rename(out)
