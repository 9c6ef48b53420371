# vdev — the commands a newcomer needs: `make demo` and `make test`.
# Everything external is provisioned by `make deps` into .deps/ (git-ignored);
# the Python environment lives in .venv/.  Both steps are idempotent.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: all deps venv test demo bench clean-deps

all: test

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	@$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $@

venv: $(VENV)/.installed

deps: venv
	@tools/provision.sh

test: deps
	$(PY) -m pytest $(PYTEST_ARGS)

demo: deps
	$(PY) examples/demo.py

clean-deps:
	rm -rf .deps
