# The two commands of the README:
#   make demo   set up a virtualenv and run the demo
#   make test   set up a virtualenv and run lint, types and the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest fuzz bench clean

$(STAMP): pyproject.toml requirements-dev.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/balancekit demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy balancekit balancekit_flask balancekit_django tests example_projects/canary_plugin/src example_projects/canary_plugin/tests

pytest: $(STAMP)
	PYTHONDEVMODE=1 $(PY) -m pytest -W error::ResourceWarning $(PYTEST_ARGS)

test: lint typecheck pytest

# The atheris fuzzers from their committed seeds, FUZZ_SECONDS (30) each.
fuzz: $(STAMP)
	PY=$(PY) bash fuzz/run.sh

bench: $(STAMP)
	$(PY) bench/proxy_bench.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
