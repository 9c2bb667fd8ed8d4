# Quick start: `make run` serves the bundled demo model, `make test` runs the whole test suite.
# Both create the virtual environment they need. The CPU build of torch is installed first so that
# pip does not pull a multi-GB CUDA build; GPU users install their CUDA torch before `make install`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	# The CPU kernels compile here, once, rather than in a first run.
	$(BIN)/python -c "from mgpu.layers import cpu_kernels; cpu_kernels.kernel()"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/mgpu serve --device cpu $(ARGS)

test: $(STAMP)
	$(BIN)/pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts

bench: $(STAMP)
	$(BIN)/python benchmarks/decode_speed.py --compile
	$(BIN)/python benchmarks/serve_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache
