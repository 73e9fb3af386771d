# Two entry points for a new user: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test bench install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/ecom db upgrade
	$(BIN)/ecom run

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench.actors

clean:
	rm -rf $(VENV) var .pytest_cache
