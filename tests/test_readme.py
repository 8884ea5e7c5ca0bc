"""The README and docs/ say what is true: each ```python block of README.md and docs/*.md runs as
written, in a fresh namespace (its own asserts check what it claims); the README's benchmark
commands run; the README stays short; every relative link points at a file in the repository."""
import re
import subprocess
import sys
from urllib.parse import unquote

import pytest

from helpers import ROOT

README = (ROOT / "README.md").read_text()
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOCS, ROOT / "CHANGELOG.md"]
README_MAX_LINES = 200


def python_blocks(text):
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


BLOCKS = [(path.relative_to(ROOT).as_posix(), i, block)
          for path in (ROOT / "README.md", *DOCS)
          for i, block in enumerate(python_blocks(path.read_text()))]


def test_readme_has_the_examples():
    readme = [b for name, _, b in BLOCKS if name == "README.md"]
    assert len(readme) >= 2  # the drop-in and the EmuDecoder service example
    assert any("emu_fast.accelerate(model)" in b for b in readme)
    assert any("EmuDecoder.from_llama" in b for b in readme)


@pytest.mark.parametrize("name,index,block", BLOCKS, ids=[f"{name}-{i}" for name, i, _ in BLOCKS])
def test_python_block_runs(name, index, block):
    exec(compile(block, f"{name} python block {index}", "exec"), {"__name__": "__readme__"})


def test_readme_is_short():
    assert len(README.splitlines()) <= README_MAX_LINES


# [text](target) links, not images' or code's: a target without a scheme is a path relative to
# the page (an #anchor after it is dropped), and must exist in the repository.
LINK = re.compile(r"(?<!!)\[[^\]\n]*\]\(([^)\s]+)\)")


def without_code(text):
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)  # fenced blocks
    return re.sub(r"`[^`\n]*`", "", text)                        # inline code


def relative_links(path):
    """(file, anchor) for each link of the page that is not a URL; file is the page itself for
    a bare #anchor."""
    for target in LINK.findall(without_code(path.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):
            continue
        file, _, anchor = unquote(target).partition("#")
        yield (path.parent / file).resolve() if file else path, anchor


def anchors(path):
    """GitHub's heading ids: lower case, punctuation dropped (hyphens and underscores kept),
    spaces as hyphens."""
    headings = re.findall(r"^#{1,6} +(.+?) *$", re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M),
                          flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    links = list(relative_links(page))
    outside = [str(f) for f, _ in links if not f.is_relative_to(ROOT)]
    missing = [str(f.relative_to(ROOT)) for f, _ in links if f.is_relative_to(ROOT) and not f.exists()]
    assert not outside and not missing, f"{page.relative_to(ROOT)} links outside the repository or to missing files: {outside + missing}"
    bad = [f"{f.relative_to(ROOT)}#{a}" for f, a in links if a and f.suffix == ".md" and a not in anchors(f)]
    assert not bad, f"{page.relative_to(ROOT)} links to missing headings: {bad}"


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
