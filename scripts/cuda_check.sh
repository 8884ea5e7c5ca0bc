#!/usr/bin/env bash
# Compiles every CUDA source with this machine's nvcc for sm_80 and sm_90a, without a GPU and
# without torch's CUDA libraries: the torch-free kernels (every kernels/cuda/*.cuh with its
# launchers instantiated for all types and head sizes), the torch
# glue against torch's headers (compile only, no link), and the host code of the CUDA graph
# path. A CPU build of torch lacks one generated CUDA config header; a stand-in is written to
# build/cuda-check/include for this check only. SKIP_KERNELS=1 / SKIP_GLUE=1 skip the two nvcc
# steps when iterating on one part.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
NVCC=${NVCC:-nvcc}
command -v "$NVCC" >/dev/null || { echo "cuda-check: nvcc not found"; exit 1; }
TORCH_DIR=$("$PYTHON" -c "import torch, os; print(os.path.dirname(torch.__file__))")
CUDA_INC=$(dirname "$(dirname "$(readlink -f "$(command -v "$NVCC")")")")/include
[ -f "$CUDA_INC/cuda_runtime.h" ] || CUDA_INC=/usr/local/cuda/include
OUT=build/cuda-check
mkdir -p "$OUT/include/c10/cuda/impl"
if [ ! -f "$TORCH_DIR/include/c10/cuda/impl/cuda_cmake_macros.h" ]; then
  echo '#define C10_CUDA_BUILD_SHARED_LIBS' > "$OUT/include/c10/cuda/impl/cuda_cmake_macros.h"
fi
INC=(-Icsrc -I"$OUT/include" -I"$TORCH_DIR/include" -I"$TORCH_DIR/include/torch/csrc/api/include")
ARCH=(-gencode arch=compute_80,code=sm_80 -gencode arch=compute_90a,code=sm_90a)
set -x
# Every kernel header compiled with its own launchers instantiated for each type.
# (the same .cu the static report compiles: scripts/static_report_source.py all_kernels_source)
ALL_KERNELS=$("$PYTHON" -c "import sys; sys.path.insert(0, 'scripts'); import static_report_source as s; print(s.all_kernels_source('.', '$OUT'))")
[ "${SKIP_KERNELS:-0}" = 1 ] || "$NVCC" -std=c++20 -O3 "${ARCH[@]}" -Werror all-warnings -Icsrc -c "$ALL_KERNELS" -o "$OUT/kernels_all.o"
if [ "${SKIP_GLUE:-0}" != 1 ]; then
  for f in csrc/ops/*.cu; do
    "$NVCC" -std=c++20 -O3 "${ARCH[@]}" --expt-relaxed-constexpr "${INC[@]}" -DEMU_FAST_WITH_CUDA=1 \
      -c "$f" -o "$OUT/$(basename "$f" .cu).o"
  done
fi
for f in csrc/decoder/*.cpp csrc/ops/op_set.cpp; do
  g++ -std=c++20 -fsyntax-only -Wall -Wno-unused-parameter "${INC[@]}" -I"$CUDA_INC" -DEMU_FAST_WITH_CUDA=1 "$f"
done
set +x
echo "cuda-check: OK (kernels, torch glue and CUDA graph host code compile for sm_80 and sm_90a)"
