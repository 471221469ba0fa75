# Two entry points for a fresh machine: `make demo` and `make test` (both install first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test test-all clean-demo

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/medimgen demo

test: install
	$(PY) -m pytest -m "not gpu and not slow"

test-all: install
	$(PY) -m pytest

clean-demo:
	rm -rf demo_workspace mlruns mlflow.db
