# Fresh machine:  make test        (install, build, run the test suite)
#                 make bench       (install, build, run the latency benchmark)
#                 make cuda-check  (compile every CUDA source with nvcc for sm_80/sm_90a; no GPU needed)
PYTHON ?= python3

.PHONY: setup build test bench cuda-check clean

setup:
	PYTHON=$(PYTHON) bash scripts/setup.sh

build: setup

test: setup
	$(PYTHON) -m pytest -q tests

bench: setup
	$(PYTHON) benchmarks/latency.py

cuda-check: setup
	PYTHON=$(PYTHON) bash scripts/cuda_check.sh

clean:
	rm -rf build emu_fast/_C*.so *.egg-info
