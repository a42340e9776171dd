# Every target sets up what it needs: a virtual environment in .venv with lmforge installed.
# TORCH picks the PyTorch build: the default is the CPU wheel; on a CUDA machine use e.g.
#   make quickstart TORCH="torch==2.11.0"
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin

.PHONY: quickstart test lint clean mutate

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $@

quickstart: $(BIN)/.installed
	$(BIN)/lmforge quickstart

test: $(BIN)/.installed
	$(BIN)/ruff check src tests benchmarks tools
	$(BIN)/lint-imports
	$(BIN)/mypy src
	$(BIN)/pytest -q -n 2 --dist loadscope --no-loadscope-reorder

lint: $(BIN)/.installed
	$(BIN)/ruff check src tests benchmarks tools
	$(BIN)/ruff format --check src tests benchmarks tools
	$(BIN)/lint-imports
	$(BIN)/mypy src

# Mutation testing (docs/reliability.md, "Mutation testing"); not part of CI: about 10 minutes here.
mutate: $(BIN)/.installed
	$(BIN)/pip install --quiet --disable-pip-version-check "mutmut==3.8.1"
	$(BIN)/python tools/mutate.py

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .import_linter_cache
