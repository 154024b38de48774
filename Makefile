# The two commands a newcomer runs: `make demo` and `make test`.
# Both create .venv and install the pinned requirements when needed.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
INTERRUPTIONS ?= 3
DEMO_ARGS ?=

.PHONY: demo test lint unit e2e bench bench-smoke validate build clean

$(STAMP): requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m spotrun_local demo --interruptions $(INTERRUPTIONS) $(DEMO_ARGS)

test: $(STAMP) lint
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

unit: $(STAMP)
	$(PY) -m pytest -m "not e2e"

e2e: $(STAMP)
	$(PY) -m pytest -m e2e

validate: $(STAMP)
	$(VENV)/bin/sam validate --lint
	$(VENV)/bin/cfn-lint template.yaml

bench: $(STAMP)
	PYTHONPATH=trainer $(PY) bench/checkpoint.py

bench-smoke: $(STAMP)
	PYTHONPATH=trainer $(PY) bench/checkpoint.py --params 2000000 --runs 1

build: $(STAMP)
	$(VENV)/bin/sam build

clean:
	rm -rf out .aws-sam .pytest_cache .ruff_cache
