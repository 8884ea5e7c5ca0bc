"""What several test modules share: where the carried Emu data lives, tolerances, comparisons.
Test modules import this, never each other."""
from __future__ import annotations

import os
from pathlib import Path


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
