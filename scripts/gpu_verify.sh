#!/usr/bin/env bash
# Everything a session with a GPU should run, in one go (device time is short): build, the
# whole test suite, compute-sanitizer (memcheck, racecheck, synccheck, initcheck) on the CUDA
# tests, and the two benchmark points of the CUDA issue. Results land in benchmarks/results/ as JSON plus the
# printed tables, named after the GPU and the date; commit them.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT_DIR:-benchmarks/results}
mkdir -p "$OUT"
"$PYTHON" -m pip install -q --no-build-isolation -e . || exit 1
GPU=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")
TAG="$GPU-$(date -u +%Y%m%d)-$(git rev-parse --short HEAD 2>/dev/null || echo nogit)"
status=0
# run_to FILE CMD...: runs CMD, shows and keeps its output, remembers a failure.
run_to() {
  local file=$1
  shift
  echo "=== $*"
  "$@" > "$file" 2>&1
  local rc=$?
  tail -40 "$file"
  [ $rc -eq 0 ] || { echo "FAILED ($rc): $*"; status=1; }
}

run_to "$OUT/$TAG-tests.txt" "$PYTHON" -m pytest -q tests
if command -v compute-sanitizer >/dev/null; then
  # memcheck: out-of-bounds and misaligned accesses; racecheck: shared-memory races; synccheck:
  # barriers and warp syncs reached by the wrong threads; initcheck: reads of uninitialized
  # device memory (the split-KV workspace, the cache past each row's length).
  for tool in memcheck racecheck synccheck initcheck; do
    run_to "$OUT/$TAG-sanitizer-$tool.txt" compute-sanitizer --tool "$tool" --error-exitcode 1 \
      "$PYTHON" -m pytest -q -x tests/gpu/test_cuda.py -k "decode_attention or gemv or glue or graph_equals"
  done
fi
run_to "$OUT/$TAG-emu1-13b-b1-p128.txt" "$PYTHON" benchmarks/latency.py --profile 4 --json "$OUT/$TAG-emu1-13b-b1-p128.json"
# The same point with programmatic dependent launch off: what PDL buys (the static report assumes
# 1.2 us a kernel) and that the answers do not change (the benchmark checks its errors).
run_to "$OUT/$TAG-emu1-13b-b1-p128-nopdl.txt" env EMU_FAST_PDL=0 "$PYTHON" benchmarks/latency.py \
  --json "$OUT/$TAG-emu1-13b-b1-p128-nopdl.json"
run_to "$OUT/$TAG-emu1-13b-b8-p512.txt" "$PYTHON" benchmarks/latency.py --batch 8 --prompt-len 512 --reps 2 \
  --json "$OUT/$TAG-emu1-13b-b8-p512.json"
# Issue 10: the weight-only GEMVs against bf16 at Emu1-13B's qkv and down_proj shapes, batch 1
# and 8 (bf16 activations: the tensor-core kernels), and the quantized rows of the step.
for shape in "--k 5120 --n 15360" "--k 13824 --n 5120"; do
  for b in 1 8; do
    run_to "$OUT/$TAG-quantized-gemv-${shape// /}-b$b.txt" "$PYTHON" benchmarks/quantized_gemv.py --device cuda \
      $shape --batch $b
  done
done
exit $status
