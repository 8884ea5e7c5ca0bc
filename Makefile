# Fresh machine:  make test   (install, build, run the test suite)
#                 make bench  (install, build, run the latency benchmark)
PYTHON ?= python3

.PHONY: setup build test bench cuda-check clean

setup:
	PYTHON=$(PYTHON) bash scripts/setup.sh

build: setup

test: setup
	$(PYTHON) -m pytest -q tests

bench: setup
	$(PYTHON) benchmarks/latency.py

clean:
	rm -rf build emu_fast/_C*.so *.egg-info
