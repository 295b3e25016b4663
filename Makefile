# Two commands on a fresh machine:  `make run` (install + the whole pipeline)  and  `make test`.
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch; on a GPU machine install your CUDA build first, e.g. TORCH_SPEC=torch==2.14.1
TORCH_SPEC ?= torch==2.13.0
export PATH := $(abspath $(BIN)):$(PATH)
# CALVIN's simulator for eval.env=calvin (docs/calvin.md): installed from this directory when it exists
# (offline machines and CI keep a calvin_env snapshot beside the clone), editable so that calvin_env finds
# the conf/ and data/ beside its package. Without it: pip install ".[calvin]" (its git URL), or nothing;
# the embedded tabletop needs none of it and the CALVIN tests skip.
CALVIN_ENV ?= ../shared/calvin_env

.PHONY: install install-calvin run test test-fast lint format

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	if [ -d "$(CALVIN_ENV)" ]; then \
		$(BIN)/python -m pip install -q -e ".[dev,calvin-sim]" && \
		$(BIN)/python -m pip install -q --no-deps -e "$(CALVIN_ENV)"; \
	fi
	touch $@

install-calvin: $(VENV)/.installed  # again, e.g. after CALVIN_ENV=/path/to/calvin_env appeared
	$(BIN)/python -m pip install -q -e ".[dev,calvin-sim]"
	$(BIN)/python -m pip install -q --no-deps -e "$(CALVIN_ENV)"

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
