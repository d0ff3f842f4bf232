# Every target creates .venv itself: a fresh machine needs only Python 3, a C compiler and make.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
# Rebuild when anything that feeds the build changes.
BUILD_INPUTS := pyproject.toml setup.py $(shell find proto relay_server/_fast -name '*.proto' -o -name '*.pxd' -o -name '*.py' 2>/dev/null)

PY_SOURCES := $(wildcard relay_server tests bench clients)

.PHONY: all demo test soak bench bench-quick lint clean

all: $(INSTALLED)

$(INSTALLED): $(BUILD_INPUTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

demo: $(INSTALLED)
	$(PY) -m relay_server demo

test: $(INSTALLED)
	$(PY) -m pytest -q

soak: $(INSTALLED)
	$(PY) -m pytest -q -m slow

bench: $(INSTALLED)
	$(PY) -m bench

bench-quick: $(INSTALLED)
	$(PY) -m bench --quick

lint: $(INSTALLED)
	$(VENV)/bin/ruff check $(PY_SOURCES)
	$(VENV)/bin/ruff format --check $(PY_SOURCES)
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) build *.egg-info relay_server/api
	find relay_server -name '*.so' -delete -o -name '*.c' -path '*/_fast/*' -delete
