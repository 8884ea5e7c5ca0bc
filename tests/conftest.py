import copy
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_EMU = Path(os.environ.get("EMU_SHARED_DIR", ROOT.parent / "shared" / "emu"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def _base_tokenizer():
    from transformers import AutoTokenizer

    path = SHARED_EMU / "emu1_llama_config"
    if not (path / "tokenizer.json").exists():
        pytest.skip(f"the real Emu tokenizer is not at {path} (set EMU_SHARED_DIR)")
    tok = AutoTokenizer.from_pretrained(str(path))
    # Emu adds these in this order; ids 32000..32003 as in SEMANTICS.md.
    tok.add_special_tokens({"pad_token": "[PAD]"})
    tok.add_tokens(["[IMG]", "[/IMG]", "<image>"], special_tokens=True)
    assert tok.convert_tokens_to_ids(["[PAD]", "[IMG]", "[/IMG]", "<image>"]) == [32000, 32001, 32002, 32003]
    return tok


@pytest.fixture
def emu_tokenizer(_base_tokenizer):
    """A fresh copy of the real Emu1 tokenizer with Emu's special tokens (tests set padding_side)."""
    return copy.deepcopy(_base_tokenizer)
