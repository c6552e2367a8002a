# `make demo` and `make test` work on a machine that has only Python 3.11:
# each creates .venv and installs vqstudy with its dev extras on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

install: $(STAMP)

# The quickstart study: vq vs simvq x 4 codebook sizes on a local Ray instance, tracked in
# runs/demo/mlflow.db (runs/demo is the demo's own folder and is replaced on each run).
demo: $(STAMP)
	rm -rf runs/demo
	$(BIN)/vqstudy run studies/quickstart.yaml --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Everything but the tests that start Ray, a cluster or driver processes (about 25 s on 2 cores).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/quantizer_bench.py
	$(BIN)/python benchmarks/orchestration_bench.py

clean:
	rm -rf $(VENV) .pytest_cache runs
