# metalseed — make setup | demo | test | bench | lint
# All targets that run code call `setup` first; it is idempotent and takes
# about a second when everything is already installed.
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test unit bench lint clean

setup:
	@bash scripts/setup.sh

demo: setup
	@$(PY) -m bootstrap.lab.demo

test: setup
	@bash scripts/run-tests.sh $(PYTEST_ARGS)

unit: setup
	@$(PY) -m pytest -q tests/unit

bench: setup
	@$(PY) -m bench.run

lint: setup
	@$(VENV)/bin/ruff check bootstrap tests bench
	@$(VENV)/bin/ruff format --check bootstrap tests bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
