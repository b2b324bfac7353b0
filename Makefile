# Two commands: `make demo` and `make test`. Each sets up .venv by itself on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned only so that set-up is reproducible; any torch>=2.4 works (override: make TORCH=torch).
TORCH ?= torch==2.13.0

.PHONY: setup demo test world clean

$(BIN)/spo: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(BIN)/spo

setup: $(BIN)/spo

demo: setup
	$(BIN)/spo demo --out runs/demo --overwrite

test: setup
	$(BIN)/python -m pytest -q

# Rebuild every embedded-world artifact from its seed (about 45 min on 2 CPU cores).
world: setup
	$(BIN)/spo world build --out src/spo/assets/world --force

clean:
	rm -rf $(VENV) runs .pytest_cache
