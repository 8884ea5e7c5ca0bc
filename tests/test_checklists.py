"""The contributor checklists (CONTRIBUTING.md, docs/adding-*.md) stay true: every path they name
exists, each numbered list has the number of files its heading states, and every op stem has its
file in each layer (csrc/ops/<op>.cpp and .cu, csrc/kernels/cpu/<op>.h, csrc/kernels/cuda/<op>.cuh)."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("adding-*.md"))]
TOP = ("csrc/", "emu_fast/", "tests/", "docs/", "scripts/", "benchmarks/")
STEMS = sorted(p.stem for p in (ROOT / "csrc/ops").glob("*.cpp") if "kSchemas" in p.read_text())


def _exists(path):
    return any(ROOT.glob(path)) if "*" in path else (ROOT / path).exists()


def _expand(path):
    """`a/{b,c}.h` -> a/b.h, a/c.h."""
    m = re.search(r"\{([^}]*)\}", path)
    if m:
        return [q for part in m.group(1).split(",") for q in _expand(path[:m.start()] + part + path[m.end():])]
    return [path]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_named_path_exists(doc):
    named = [p for p in re.findall(r"`([^`\s]+)`", doc.read_text()) if p.startswith(TOP)]
    assert named, f"{doc.name} names no path"
    missing = []
    for p in named:
        for q in _expand(p.rstrip("/")):
            # `<op>`: the file every stem has, or (`<op>_cpu.cpp`, per instruction set) some stem has
            # `<level>`: one file per instruction-set level; at least the generic one and another
            if "<level>" in q:
                found = [len(list(ROOT.glob(q.replace("<level>", "*")))) >= 2 and _exists(q.replace("<level>", "generic"))]
            else:
                found = [_exists(q.replace("<op>", stem)) for stem in STEMS] if "<op>" in q else [_exists(q)]
            if not (all(found) if q.count("<op>") and "_cpu." not in q else any(found)):
                missing.append(q)
    assert not missing, f"{doc.name} names paths that do not exist: {missing}"


def _numbered(section):
    return [int(m) for m in re.findall(r"^(\d+)\. ", section, flags=re.M)]


def test_op_checklist_counts_what_it_lists():
    text = (ROOT / "docs/adding-an-op.md").read_text()
    files = re.search(r"^## The files \((\d+);.*?\n(.*?)(?=^## )", text, flags=re.M | re.S)
    step = re.search(r"^## An op the decode step uses \((\d+) more\)\n(.*)", text, flags=re.M | re.S)
    n_files, n_step = int(files.group(1)), int(step.group(1))
    assert _numbered(files.group(2)) == list(range(1, n_files + 1))
    assert _numbered(step.group(2)) == list(range(n_files + 1, n_files + n_step + 1))
    contributing = (ROOT / "CONTRIBUTING.md").read_text()
    assert f"`docs/adding-an-op.md` ({n_files} files; {n_files + n_step} for an op the decode step uses)" in contributing


@pytest.mark.parametrize("name", ["adding-a-scheme.md", "adding-an-isa.md"])
def test_scheme_and_isa_checklists_count_what_they_list(name):
    text = (ROOT / "docs" / name).read_text()
    files = re.search(r"^## The files \((\d+)\)\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert files, f"{name} has no '## The files (N)' section"
    assert _numbered(files.group(2)) == list(range(1, int(files.group(1)) + 1))


def test_every_op_stem_has_its_file_in_each_layer():
    assert {"decode_attention", "gemv", "norm", "quantized_gemv", "splice_embeddings"} <= set(STEMS)
    for stem in STEMS:
        for layer in (f"csrc/ops/{stem}.cu", f"csrc/kernels/cpu/{stem}.h", f"csrc/kernels/cuda/{stem}.cuh"):
            assert (ROOT / layer).exists(), f"op stem {stem} has no {layer}"
