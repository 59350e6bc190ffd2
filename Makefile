# Set-up and checks. Every target creates or reuses .venv, so a fresh clone needs only `make X`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HASH := $(shell cksum < pyproject.toml | cut -d' ' -f1)
PYTEST_ARGS ?=
DEMO_ARGS ?= --plot demo-output/simulate.png

.PHONY: install install-demo test lint demo bench soak clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The demo needs only the package and its CLI extra.
$(VENV)/.demo-$(HASH): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[cli]"
	rm -f $(VENV)/.demo-*
	touch $@

# Tests, lint and benchmarks need every extra and the test tools.
$(VENV)/.test-$(HASH): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	rm -f $(VENV)/.test-* $(VENV)/.demo-*
	touch $@ $(VENV)/.demo-$(HASH)

install-demo: $(VENV)/.demo-$(HASH)
install: $(VENV)/.test-$(HASH)

demo: $(VENV)/.demo-$(HASH)
	mkdir -p demo-output
	$(BIN)/holysheep simulate $(DEMO_ARGS)
	@echo "The plot is in demo-output/simulate.png"

test: $(VENV)/.test-$(HASH)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.test-$(HASH)
	$(BIN)/ruff check langchain_holysheep tests benchmarks notebooks
	$(BIN)/ruff format --check langchain_holysheep tests benchmarks notebooks
	$(BIN)/mypy
	$(BIN)/mypy tests benchmarks

bench: $(VENV)/.test-$(HASH)
	$(BIN)/python benchmarks/bench_tokens.py
	$(BIN)/python benchmarks/bench_window.py
	$(BIN)/python benchmarks/bench_prepare.py
	$(BIN)/python benchmarks/bench_cost.py
	$(BIN)/python benchmarks/bench_agent.py
	$(BIN)/python benchmarks/bench_stores.py
	$(BIN)/python benchmarks/bench_background.py

soak: $(VENV)/.test-$(HASH)
	HOLYSHEEP_SOAK=1 $(BIN)/python -m pytest tests/reliability $(PYTEST_ARGS)
	$(BIN)/python benchmarks/soak.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build dist demo-output
