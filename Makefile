# The two quickstart commands. Both work on a fresh machine with Python 3.11+ and pip.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: start test lint bench clean

$(BIN)/lodestore: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

# Start Lodestore on its embedded default store and show a round trip through it.
start: $(BIN)/lodestore
	@./examples/quickstart.sh

# Run the whole test suite (creates its own virtual environment).
test: $(BIN)/lodestore
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

bench: $(BIN)/lodestore
	$(BIN)/lodestore bench

clean:
	rm -rf $(VENV) build *.egg-info
