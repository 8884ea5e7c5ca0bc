# Fresh machine:  make test        (install what is missing, build, run the test suite)
#                 make bench       (the same setup, then the latency benchmark: a table, a sweep, a PNG)
#                 make test-transformers-4.31   (the suite again under Emu2's pinned transformers)
#                 make cuda-check  (compile every CUDA source with nvcc for sm_80/sm_90a; no GPU needed)
#                 make static-report (estimate the CUDA step from its compiled code; no GPU needed)
# The install step reruns only when a source, the build files or the setup script changed
# (a stamp per interpreter under build/), so repeated targets start at once.
PYTHON ?= python3
# The transformers Emu2 pins (Emu1's code is of the same era): a venv that sees everything else
# installed for $(PYTHON) and overrides only transformers (scripts/transformers_env.sh).
OLD_TRANSFORMERS := 4.31.0
OLD_VENV := build/venv-transformers-$(OLD_TRANSFORMERS)

PY_ID := $(shell $(PYTHON) -c 'import sys, hashlib; print(hashlib.md5(sys.executable.encode()).hexdigest()[:8])' 2>/dev/null)
STAMP := build/.installed-$(PY_ID)
SOURCES := $(shell find csrc -type f 2>/dev/null) setup.py CMakeLists.txt scripts/setup.sh

.PHONY: setup build test test-transformers-4.31 bench cuda-check static-report clean

$(STAMP): $(SOURCES)
	PYTHON=$(PYTHON) bash scripts/setup.sh
	@mkdir -p build && touch $@

setup build: $(STAMP)

test: $(STAMP)
	$(PYTHON) -m pytest -q tests

$(OLD_VENV)/.ready: $(STAMP) scripts/transformers_env.sh
	PYTHON=$(PYTHON) bash scripts/transformers_env.sh $(OLD_TRANSFORMERS) $(OLD_VENV)
	@touch $@

test-transformers-4.31: $(OLD_VENV)/.ready
	$(OLD_VENV)/bin/python -m pytest -q tests

# The default point (a table, all five methods), then the sweep over batch and prompt length
# without the slow upstream loop, drawn as a PNG (about 3 minutes on 2 cores in all).
bench: $(STAMP)
	$(PYTHON) benchmarks/latency.py --json build/bench.json
	$(PYTHON) benchmarks/latency.py --sweep --skip-upstream --plot build/bench-sweep.png --json build/bench-sweep.json

cuda-check: $(STAMP)
	PYTHON=$(PYTHON) bash scripts/cuda_check.sh

# The static performance report of the CUDA step (estimates from compiled code; nvcc, and
# nvdisasm from the toolkit or its PyPI wheel), written under build/ so a run leaves the
# committed benchmarks/results/static-report* alone.
static-report:
	@mkdir -p build
	$(PYTHON) scripts/static_report.py --out build/static-report > build/static-report.log 2>&1; \
	  status=$$?; cat build/static-report.log; exit $$status

clean:
	rm -rf build emu_fast/_C*.so *.egg-info
