# Entry points for a new user: `make run`, `make test`, and `make shell` (a shell where `ecom` is on the PATH).
# The interpreter the virtual environment is made from (PYTHON=... overrides; any CPython 3.11+ works): the
# distribution's python3 when it is 3.11 or newer and can make a virtual environment (Debian: python3-venv), else
# the first python3 on the PATH. Distributions build CPython with profile-guided and link-time optimisation and a
# statically linked interpreter, as the python images deploy/Dockerfile builds on are; a source build without
# them (pyenv's default) took 1.12x the CPU per storefront request and 1.7x the time of pure-Python loops
# (issue 14, measured side by side). `make clean install` after a change.
SYSTEM_PYTHON := $(shell /usr/bin/python3 -c 'import ensurepip, sys; print(sys.version_info >= (3, 11))' 2>/dev/null)
PYTHON ?= $(if $(filter True,$(SYSTEM_PYTHON)),/usr/bin/python3,python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench bench-all install shell clean

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
	$(BIN)/python -m pytest -q -ra --durations=15 $(PYTEST_ARGS)

# The static gate (.ci/run runs it before the tests): lint rules, formatting, types; config in pyproject.toml.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# A shell with the virtual environment active: `ecom ...` as written in README.md; `exit` leaves it.
shell: $(STAMP)
	@echo "ecom is on the PATH in this shell ($(abspath $(BIN))); type exit to leave it"
	@VIRTUAL_ENV="$(abspath $(VENV))" PATH="$(abspath $(BIN)):$$PATH" exec "$${SHELL:-/bin/sh}" -i

bench: $(STAMP)
	$(BIN)/python -m bench.actors

# Every benchmark (--quick runs; BENCH_ARGS=--full for full ones) -> var/bench/results.md, one markdown table.
bench-all: $(STAMP)
	$(BIN)/python -m bench.all $(BENCH_ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache
