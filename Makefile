# Two commands on a fresh machine:  `make run` (install + the whole pipeline)  and  `make test`.
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch; on a GPU machine install your CUDA build first, e.g. TORCH_SPEC=torch==2.14.1
TORCH_SPEC ?= torch==2.13.0
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install run test test-fast lint format

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

run: $(VENV)/.installed
	$(BIN)/dvc repro

# the linter and the formatter first (ruff, configured in pyproject.toml), then every test
test: lint
	$(BIN)/python -m pytest

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(VENV)/.installed
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test-fast: $(VENV)/.installed
	$(BIN)/python -m pytest -m "not slow"
