# The two commands a newcomer runs: `make demo` and `make test`. Both build the venv when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Pinned: a bare `torch` requirement would pull a multi-GB CUDA build; this pin takes the CPU wheel.
TORCH_PIN ?= torch==2.13.0

.PHONY: demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(PY) -m fxfuse demo

test: $(VENV)/.installed
	$(PY) -m pytest -q tests
	$(PY) -m fxfuse bench --quick --baseline benchmarks/baselines/cpu.json

lint: $(VENV)/.installed
	$(PY) -m ruff check fxfuse tests examples benchmarks

bench: $(VENV)/.installed
	$(PY) -m fxfuse bench --json benchmarks/results/cpu-latest.json --plot benchmarks/results/cpu-speedups.png

# Generated attention spellings, a larger run than CI's fixed-seed sample: fused / missed / wrong counts
.PHONY: spellings
spellings: $(VENV)/.installed
	$(PY) -m tests.spellings --n 2000

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
