import os
import sys
from pathlib import Path

import pytest
import torch

# The test modules sit in folders by layer (ops/, decoder/, quant/, models/, gpu/, emulators/);
# the helpers they share (helpers, op_samples, decoder_setup, quant_samples, the emulators) sit
# here, importable from every folder.
sys.path.insert(0, str(Path(__file__).resolve().parent))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def emu_tokenizer():
    """A fresh copy of the real Emu1 tokenizer with Emu's special tokens (tests set padding_side):
    the copy emu_fast carries, or $EMU_TOKENIZER_DIR (e.g. ../shared/emu/emu1_llama_config)."""
    from emu_fast.testing import emu_tokenizer

    return emu_tokenizer()
