# Set-up and checks; every target creates the virtual environment it needs.
# Override TORCH for a GPU build, e.g.  make test TORCH="torch==2.5.1 --index-url https://download.pytorch.org/whl/cu124"
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
# The oldest versions pyproject.toml declares, pinned in .ci/oldest.txt, in a venv of their own.
OLDEST_VENV ?= .venv-oldest
OLDEST_BIN := $(OLDEST_VENV)/bin

.PHONY: demo test test-oldest lint bench

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

demo: $(BIN)/.installed
	$(BIN)/lightning-rsm demo

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest

$(OLDEST_BIN)/.installed: pyproject.toml .ci/oldest.txt
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_BIN)/python -m pip install -q --upgrade pip
	$(OLDEST_BIN)/python -m pip install -q -c .ci/oldest.txt -e ".[dev]"
	touch $@

# The tests marked `oldest` (pyproject.toml's markers) on the oldest declared versions.
test-oldest: $(OLDEST_BIN)/.installed
	$(OLDEST_BIN)/python -m pytest -m oldest -p no:cacheprovider

bench: $(BIN)/.installed
	for script in benchmarks/bench_*.py; do $(BIN)/python $$script || exit 1; done
