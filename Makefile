# pipeprop developer entry points. Everything runs inside .venv, created on first use.
PYTHON     ?= python3
VENV       ?= .venv
BIN        := $(VENV)/bin
# A CPU build of torch; set TORCH_SPEC to your own (e.g. a CUDA wheel) before the first `make`.
TORCH_SPEC ?= torch==2.13.0
STAMP      := $(VENV)/.pipeprop-installed

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[all]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/pipeprop demo --out results/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bench_table.py

clean:
	rm -rf $(VENV) results build dist src/*.egg-info .pytest_cache
