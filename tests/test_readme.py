"""The README's examples run as written: each ```python block, in a fresh namespace (its own
asserts check what it claims), and the benchmark command."""
import re
import subprocess
import sys

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


# The README's benchmark commands (```bash lines starting with `python benchmarks/`), run as
# written from the repository root with this interpreter: about 20 s for the default point.
COMMANDS = [line.split()[1:] for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S)
            for line in block.splitlines() if line.startswith("python benchmarks/")]


def test_readme_has_the_benchmark_command():
    assert ["benchmarks/latency.py"] in COMMANDS


@pytest.mark.parametrize("argv", COMMANDS, ids=" ".join)
def test_readme_benchmark_command_runs(argv):
    done = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    for method in ("upstream recompute", "HF KV-cache loop", "static cache, eager", "emu_fast"):
        assert re.search(rf"^{re.escape(method)}\s+\d", done.stdout, flags=re.M), done.stdout
    # torch.compile needs a working C++ toolchain for inductor; where it fails the row says so
    assert re.search(r"^static cache, compiled\s+(\d|.*compile failed)", done.stdout, flags=re.M), done.stdout
    assert not re.search(r"\bnan\b", done.stdout)
