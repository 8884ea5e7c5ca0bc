"""The README's Python examples run as written: each ```python block, in a fresh namespace (its
own asserts check what it claims)."""
import re

import pytest

from helpers import ROOT

README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_readme_has_the_examples():
    assert len(BLOCKS) >= 2  # the drop-in and the EmuDecoder service example
    assert any("emu_fast.accelerate(model)" in b for b in BLOCKS)
    assert any("EmuDecoder.from_llama" in b for b in BLOCKS)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index):
    exec(compile(BLOCKS[index], f"README.md python block {index}", "exec"), {"__name__": "__readme__"})
