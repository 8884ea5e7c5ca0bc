#!/usr/bin/env bash
# Installs what emu_fast needs to build and test, then builds it in place (editable).
# Installs only what is missing, so it also runs on machines without network that already
# have a (CUDA) torch. Torch 2.13.0 is the CPU build this project's machines keep on disk.
set -euo pipefail
PYTHON=${PYTHON:-python3}
cd "$(dirname "$0")/.."

missing=()
have() { "$PYTHON" -c "import $1" >/dev/null 2>&1; }
have torch || missing+=("torch==2.13.0")
# hypothesis: the fuzz tests; tqdm and matplotlib: the benchmark's progress bar and --plot.
for mod in pybind11 numpy pytest hypothesis tqdm matplotlib; do
  have "$mod" || missing+=("$mod")
done
# The version the tests were last run against; an installed one (say, a GPU machine's) is kept.
have transformers || missing+=("transformers==5.24.0")
# Hugging Face accelerate: the device_map placement the Emu2 README loads with (tests/models/test_device_map.py).
have accelerate || missing+=("accelerate==1.15.0")
# diffusers: the Emu2-Gen pipeline stand-in (tests/models/test_hub_class.py) is a DiffusionPipeline.
have diffusers || missing+=("diffusers==0.42.1")
# ninja and cmake may come as commands (system packages) or as the PyPI wheels of that name.
for tool in ninja cmake; do
  command -v "$tool" >/dev/null 2>&1 || have "$tool" || missing+=("$tool")
done
# With a CUDA build of torch, CMake must know nvcc's C++20 flag: Debian's 3.25 does not for
# nvcc 13 ("CUDA20 ... not supported" at generate time); the PyPI wheel (4.x) does.
if "$PYTHON" -c "import torch, sys; sys.exit(torch.version.cuda is None)" 2>/dev/null; then
  cmake_version=$(cmake --version 2>/dev/null | head -1 | grep -oE '[0-9]+\.[0-9]+' | head -1 || true)
  if [ -z "$cmake_version" ] || [ "$(printf '%s\n' 3.28 "$cmake_version" | sort -V | head -1)" != 3.28 ]; then
    missing+=("cmake>=3.28")
  fi
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  "$PYTHON" -m pip install -q "${missing[@]}"
fi
# ninja/cmake from pip put their binaries next to the interpreter.
export PATH="$("$PYTHON" -c 'import sys, os; print(os.path.dirname(sys.executable))'):$PATH"
"$PYTHON" -m pip install -q --no-build-isolation -e .
"$PYTHON" -c "import emu_fast, torch; print('emu_fast built against torch', torch.__version__, '| CUDA:', torch.cuda.is_available())"
