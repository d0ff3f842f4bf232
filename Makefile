# Every target creates .venv itself: a fresh machine needs only Python 3, a C compiler and make.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
# Rebuild when anything that feeds the build changes.
BUILD_INPUTS := pyproject.toml setup.py $(shell find proto relay_server/_fast -name '*.proto' -o -name '*.pxd' -o -name '*.py' 2>/dev/null)

PY_SOURCES := $(wildcard relay_server tests bench clients)
# The Node.js client's dependencies, installed for `make test` when npm is here (its test skips otherwise).
NPM := $(shell command -v npm 2>/dev/null)
NODE_DEPS := $(if $(NPM),clients/node/node_modules)
# ffprobe (Debian's ffmpeg) lets a test read the demo's output the way players do; nginx is the
# proxy in front of several replicas (deploy/nginx/nginx.conf, tests/service/test_proxy.py).
SYSTEM_TOOLS := $(if $(and $(shell command -v ffprobe 2>/dev/null),$(shell command -v nginx 2>/dev/null || test -x /usr/sbin/nginx && echo nginx)),,system-tools)

.PHONY: all demo test soak bench bench-quick lint clean system-tools

all: $(INSTALLED)

$(INSTALLED): $(BUILD_INPUTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

demo: $(INSTALLED)
	$(PY) -m relay_server demo

test: $(INSTALLED) $(NODE_DEPS) $(SYSTEM_TOOLS)
	$(PY) -m pytest -q

DEBIAN_PACKAGES := ffmpeg nginx-light
system-tools:
	@if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		{ apt-get install -y -q --no-install-recommends $(DEBIAN_PACKAGES) >/dev/null 2>&1 \
		  || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $(DEBIAN_PACKAGES) >/dev/null; }; } \
		|| echo "$(DEBIAN_PACKAGES) could not be installed: the ffprobe and nginx tests will be skipped"; \
	else echo "no apt-get as root here: the ffprobe and nginx tests will be skipped"; fi

# A failed install (no registry) only means the Node client's test skips, saying why.
clients/node/node_modules: clients/node/package.json clients/node/package-lock.json
	cd clients/node && { npm ci --no-audit --no-fund && touch node_modules; } \
		|| echo "npm ci failed: the Node.js client test will be skipped"

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
	rm -rf $(VENV) build *.egg-info relay_server/api clients/node/node_modules
	find relay_server -name '*.so' -delete -o -name '*.c' -path '*/_fast/*' -delete
